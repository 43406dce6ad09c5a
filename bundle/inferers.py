"""Test-time augmentation as a MONAI inferer, so evaluation, batch inference and serving share it.

``configs/inference.json`` declares the inferer once; train.json's validation and every server use
that declaration. Dermoscopy has no up, down, left or right: a lesion flipped or turned is the same
lesion, so averaging the logits over the image and its flips (``views="flips"``, 4 passes) or over all
8 flips and quarter turns (``views="dihedral"``, square images only) steadies the prediction at a cost
of one forward pass per view, or of one pass over a batch of all the views (``batched``). With
``crop_scale`` below 1 each view also goes in as five crops of that share of each side (the centre and
the four corners, resized back), a lesion seen a little closer: 6 times the passes.
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
MIN_CROP_SCALE = 0.5


def _flip_view(inputs: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(inputs, axes) if axes else inputs


def _crops(inputs: torch.Tensor, scale: float):
    """``inputs`` whole, then (``scale`` < 1) its centre and four corners, ``scale`` of each side, resized back."""
    yield inputs
    if scale >= 1:
        return
    height, width = inputs.shape[-2:]
    crop_h, crop_w = max(1, round(height * scale)), max(1, round(width * scale))
    corners = [(0, 0), (0, width - crop_w), (height - crop_h, 0), (height - crop_h, width - crop_w)]
    for top, left in [((height - crop_h) // 2, (width - crop_w) // 2), *corners]:
        crop = inputs[..., top : top + crop_h, left : left + crop_w]
        yield torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)


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
    ``crop_scale``: below 1, every view also as its centre and four corner crops of that share of each side,
    resized back (1: off).
    """

    def __init__(
        self, enabled: bool = True, views: str = "flips", batched: bool = False, crop_scale: float = 1.0
    ) -> None:
        super().__init__()
        if views not in VIEWS:
            raise ValueError(f"config key 'tta_views' must be one of {VIEWS}, got {views!r}")
        self.enabled = as_bool(enabled, "tta")
        self.views = views
        self.batched = as_bool(batched, "tta_batched")
        self.crop_scale = float(crop_scale)
        if not MIN_CROP_SCALE <= self.crop_scale <= 1:
            raise ValueError(f"config key 'tta_crop_scale' must be in [{MIN_CROP_SCALE}, 1] (1: off), got {crop_scale}")

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
        views = (crop for view in views for crop in _crops(view, self.crop_scale))
        if self.batched:
            logits = network(torch.cat(list(views)), *args, **kwargs).float()
            return logits.view(-1, len(inputs), *logits.shape[1:]).mean(dim=0)
        total, count = None, 0
        for view in views:
            logits = network(view, *args, **kwargs).float()
            total, count = (logits if total is None else total + logits), count + 1
        return total / count
