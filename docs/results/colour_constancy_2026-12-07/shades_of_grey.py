"""Colour constancy: each image's light source estimated and divided out (Shades of Grey).

HAM10000's images come from several dermoscopes at two sites, each with its own light and white
balance, and a network can learn the device's tint as a cue. Shades of Grey (Finlayson and Trezzi,
2004; used by several ISIC challenge entries, e.g. Barata et al. 2015) estimates the light source of
an image as the Minkowski p-norm mean of each channel, ``e_c = mean(I_c ** p) ** (1 / p)``, and
scales each channel by ``mean(e) / e_c``: the light becomes grey at the image's own brightness.
``p`` 1 is the grey-world assumption, large ``p`` tends to white patch (the brightest value); 6 is
the usual choice for dermoscopy.

An experiment, not part of the bundle (docs/RESULTS.md, "Colour constancy"): overlay.json beside this file
appends it to the preprocessing, so that the cache, training and evaluation apply it alike; serving would
need the weights' sidecar to record it, which was not built because the 32 px proxy measured it worse.
"""

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

# a channel darker than one grey level on average has no light to estimate: its gain stays bounded
DARKEST_ILLUMINANT = 1.0 / 255.0


def shades_of_grey(image: torch.Tensor, power: float) -> torch.Tensor:
    """``image`` (C, H, W) in [0, 1] with its light source made grey, still in [0, 1]."""
    channels = image.shape[0]
    flat = image.reshape(channels, -1).float().clamp(0.0, 1.0)
    illuminant = flat.pow(power).mean(dim=1).pow(1.0 / power)
    if float(illuminant.max()) < DARKEST_ILLUMINANT:  # a black frame: nothing to correct
        return image
    gain = illuminant.mean() / illuminant.clamp(min=DARKEST_ILLUMINANT)
    return (image * gain.view(channels, *([1] * (image.ndim - 1))).to(image.dtype)).clamp(0.0, 1.0)


class ShadesOfGrey(Transform):
    """``shades_of_grey`` as a MONAI transform; ``power`` 0 leaves images as they are."""

    def __init__(self, power: float = 6.0) -> None:
        if power < 0:
            raise ValueError(f"colour constancy power must be 0 (off) or positive, got {power}")
        self.power = float(power)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.power == 0 else shades_of_grey(image, self.power)


class ShadesOfGreyd(MapTransform):
    """Dictionary version of ``ShadesOfGrey``."""

    def __init__(self, keys: KeysCollection, power: float = 6.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.constancy = ShadesOfGrey(power)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.constancy(d[key])
        return d
