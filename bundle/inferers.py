"""Test-time augmentation as a MONAI inferer, so evaluation, batch inference and serving share it.

``configs/inference.json`` declares the inferer once; train.json's validation and every server use
that declaration. Dermoscopy has no up, down, left or right: a lesion flipped is the same lesion, so
averaging the logits over the image and its flips steadies the prediction at a cost of one forward
pass per view.
"""

from typing import Any

import torch
from monai.inferers import Inferer

# (H, W) axes of an (N, C, H, W) batch: identity, vertical, horizontal, both
FLIPS = ((), (2,), (3,), (2, 3))


class FlipAveragingInferer(Inferer):
    """Mean of the network's logits over the image and its three flips (``enabled=False``: one pass)."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.enabled:
            return network(inputs, *args, **kwargs)
        total = None
        for axes in FLIPS:
            logits = network(torch.flip(inputs, axes) if axes else inputs, *args, **kwargs).float()
            total = logits if total is None else total + logits
        return total / len(FLIPS)
