"""Test-time augmentation as a MONAI inferer, so evaluation, batch inference and serving share it.

``configs/inference.json`` declares the inferer once; train.json's validation and every server use
that declaration. Dermoscopy has no up, down, left or right: a lesion flipped or turned is the same
lesion, so averaging the logits over the image and its flips (``views="flips"``, 4 passes) or over all
8 flips and quarter turns (``views="dihedral"``, square images only) steadies the prediction at a cost
of one forward pass per view, or of one pass over a batch of all the views (``batched``).
"""

from typing import Any

import torch
from monai.inferers import Inferer

from bundle.flags import as_bool

# (H, W) axes of an (N, C, H, W) batch: identity, vertical, horizontal, both
FLIPS = ((), (2,), (3,), (2, 3))
# the dihedral group of the square: (quarter turns, flip the width axis first)
DIHEDRAL = tuple((turns, flip) for turns in range(4) for flip in (False, True))
VIEWS = ("flips", "dihedral")


def _flip_view(inputs: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(inputs, axes) if axes else inputs


def _dihedral_view(inputs: torch.Tensor, view: tuple[int, bool]) -> torch.Tensor:
    turns, flip = view
    inputs = torch.flip(inputs, (3,)) if flip else inputs
    return torch.rot90(inputs, turns, dims=(2, 3)) if turns else inputs


class FlipAveragingInferer(Inferer):
    """Mean of the network's logits over the image's views (``enabled=False``: one pass).

    ``views``: "flips" (the image and its three flips) or "dihedral" (its 8 flips and rotations by
    multiples of 90 degrees; square images only, as a quarter turn swaps height and width).
    ``batched``: all the views through the network as one batch of ``views x N`` images, view after view:
    a GPU pays its kernel launches once instead of once per view (a small batch's pass is bound by
    them), for as many times the activation memory. Off, one view at a time; the logits are the same.
    """

    def __init__(self, enabled: bool = True, views: str = "flips", batched: bool = False) -> None:
        super().__init__()
        if views not in VIEWS:
            raise ValueError(f"config key 'tta_views' must be one of {VIEWS}, got {views!r}")
        self.enabled = as_bool(enabled, "tta")
        self.views = views
        self.batched = as_bool(batched, "tta_batched")

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.enabled:
            return network(inputs, *args, **kwargs)
        if self.views == "dihedral":
            if inputs.shape[-2] != inputs.shape[-1]:
                raise ValueError(
                    f"config key 'tta_views' 'dihedral' needs square images, got {tuple(inputs.shape[-2:])}: "
                    "use 'flips' or a square image_size"
                )
            views = (_dihedral_view(inputs, view) for view in DIHEDRAL)
        else:
            views = (_flip_view(inputs, axes) for axes in FLIPS)
        if self.batched:
            logits = network(torch.cat(list(views)), *args, **kwargs).float()
            return logits.view(-1, len(inputs), *logits.shape[1:]).mean(dim=0)
        total, count = None, 0
        for view in views:
            logits = network(view, *args, **kwargs).float()
            total, count = (logits if total is None else total + logits), count + 1
        return total / count
