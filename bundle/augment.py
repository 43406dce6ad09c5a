"""Random spatial augmentation of a whole batch on its device, in one warp.

The per-sample chain in train.json runs MONAI's RandRotated, RandFlipd (both axes) and RandZoomd on
each image in a loader worker. ``BatchAugmentation`` does what that chain does to every image of a
batch at once: each image draws its own parameters with the same probabilities and ranges, the
rotation, flips and zoom are composed into one affine matrix per image in the same order as the
chain (rotate, flip, zoom), and one ``grid_sample`` resamples the batch with them. The matrices
follow MONAI's own ``Rotate`` convention (pull direction, array-index order, centred on the middle
pixel), so an angle means what it means to RandRotated.

Cutout (one square-ish hole of black per image, ``cutout``) follows MONAI's ``RandCoarseDropoutd``,
which the chain runs: a hole of ``cutout_pixels`` pixels, placed uniformly where it fits whole.

Nothing here copies a tensor from the host to the GPU (a blocking copy waits for the GPU to finish
everything queued): every constant is a Python number, so a training step queues its augmentation
and moves on. That is why the warp is written out here rather than MONAI's ``AffineTransform``,
which builds its normalisation matrices on the host.

Colour jitter (brightness, contrast, saturation: dermoscopes differ in light and white balance) is
one function, ``colour_jitter``, that both paths call: ``BatchAugmentation`` on the whole batch and
``RandColourJitterd`` (a MONAI transform for the per-sample chain) on one image at a time.
"""

import math
from collections.abc import Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

# ITU-R BT.601 luma weights: the grey a saturation change pulls towards
LUMA = (0.299, 0.587, 0.114)


def colour_jitter(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """Scale each RGB image of a ``(N, 3, H, W)`` 0-1 batch by its own factors (1 leaves it unchanged).

    In order: brightness multiplies every pixel; contrast scales each pixel's distance from the
    image's mean grey; saturation scales each pixel's distance from its own grey. The result is
    clipped to [0, 1], the range the preprocessing produces.
    """

    def per_image(factor):
        return factor.to(images.dtype).reshape(-1, 1, 1, 1)

    images = images * per_image(brightness)
    mean_grey = _grey(images).mean((2, 3), keepdim=True)
    images = mean_grey + (images - mean_grey) * per_image(contrast)
    grey = _grey(images)
    images = grey + (images - grey) * per_image(saturation)
    return images.clamp_(0.0, 1.0)


def cutout_pixels(fraction: float, spatial_size: Sequence[int]) -> list[int]:
    """The cutout hole's size in pixels: ``fraction`` of each side, at least one pixel."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"augmentation cutout_size must be a fraction of the side in [0, 1), got {fraction}")
    return [max(1, round(float(fraction) * int(side))) for side in spatial_size]


def cutout(images: torch.Tensor, holed: torch.Tensor, starts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Black out a ``size`` hole in each image of a ``(N, C, H, W)`` batch where ``holed`` is true.

    ``starts`` (``(N, 2)``, uniform in [0, 1)) places each hole: its first row and column are drawn
    uniformly among the positions where it fits whole, as MONAI's ``RandCoarseDropout`` does.
    """
    inside = []
    for axis, (side, hole) in enumerate(zip(images.shape[2:], size, strict=True)):
        first = torch.floor(starts[:, axis] * (side - hole + 1))[:, None]
        position = torch.arange(side, device=images.device, dtype=starts.dtype)[None]
        inside.append((position >= first) & (position < first + hole))
    hole_mask = inside[0][:, :, None] & inside[1][:, None, :] & holed[:, None, None]
    return images.masked_fill(hole_mask[:, None], 0.0)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` luma of an RGB batch (weights as Python numbers: no host-to-device copy)."""
    return sum(w * images[:, c : c + 1] for c, w in enumerate(LUMA))


def _jitter_factors(u: torch.Tensor, strength: float) -> torch.Tensor:
    """Factors uniform in [1 - strength, 1 + strength] from uniform [0, 1) draws."""
    return 1.0 + (u * 2 - 1) * strength


def _check_strength(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"augmentation {name} must be in [0, 1), got {value}")
    return float(value)


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation {name} must be in [0, 1], got {p}")


class RandColourJitterd(RandomizableTransform, MapTransform):
    """The per-sample chain's colour jitter: ``colour_jitter`` on one ``(3, H, W)`` image, with
    probability ``prob``, each factor drawn uniformly from [1 - strength, 1 + strength]."""

    def __init__(
        self,
        keys: KeysCollection,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        prob: float = 0.5,
    ) -> None:
        _check_prob("colour_prob", prob)
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.strengths = [
            _check_strength(n, v)
            for n, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation))
        ]
        self.factors = [1.0, 1.0, 1.0]

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.factors = [1.0 + self.R.uniform(-s, s) for s in self.strengths]

    def __call__(self, data: dict) -> dict:
        self.randomize()
        d = dict(data)
        if not self._do_transform:
            return d
        factors = [torch.tensor([f]) for f in self.factors]
        for key in self.key_iterator(d):
            d[key] = colour_jitter(d[key][None], *factors)[0]
        return d


class BatchAugmentation:
    """Per-sample random rotation, flips, zoom and colour jitter of a ``(N, C, H, W)`` float batch.

    Args:
        rotate_degrees: each rotated image turns by an angle drawn uniformly from ±rotate_degrees.
        rotate_prob: probability that an image is rotated (RandRotated's ``prob``).
        flip_prob: probability that an image is flipped, drawn independently for each spatial axis.
        zoom_range: (min_zoom, max_zoom); a zoomed image is scaled by a factor drawn uniformly from it.
        zoom_prob: probability that an image is zoomed.
        brightness, contrast, saturation: colour jitter strengths; a jittered image's factors are drawn
            uniformly from [1 - strength, 1 + strength] (see ``colour_jitter``). All 0: no jitter.
        colour_prob: probability that an image is colour-jittered.
        cutout_size: the cutout hole's side as a fraction of the image's (see ``cutout_pixels``); 0: no cutout.
        cutout_prob: probability that an image gets a hole.
        padding_mode: grid_sample padding for pixels pulled from outside the image ("border"
            repeats the edge, like the chain's ``border``/``edge``).
        seed: seeds the generator, so the same seed gives the same augmentation stream.
    """

    def __init__(
        self,
        rotate_degrees: float = 15.0,
        rotate_prob: float = 0.5,
        flip_prob: float = 0.5,
        zoom_range: Sequence[float] = (0.9, 1.1),
        zoom_prob: float = 0.5,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        colour_prob: float = 0.5,
        cutout_size: float = 0.0,
        cutout_prob: float = 0.5,
        padding_mode: str = "border",
        seed: int = 0,
    ) -> None:
        for name, p in (
            ("rotate_prob", rotate_prob),
            ("flip_prob", flip_prob),
            ("zoom_prob", zoom_prob),
            ("colour_prob", colour_prob),
            ("cutout_prob", cutout_prob),
        ):
            _check_prob(name, p)
        cutout_pixels(cutout_size, [1])  # refuses a bad fraction now, not at the first batch
        self.cutout_size, self.cutout_prob = float(cutout_size), cutout_prob
        self.colour_strengths = [
            _check_strength(n, v)
            for n, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation))
        ]
        self.colour_prob = colour_prob
        min_zoom, max_zoom = (float(z) for z in zoom_range)
        if not 0 < min_zoom <= max_zoom:
            raise ValueError(f"augmentation zoom_range must be 0 < min <= max, got {list(zoom_range)}")
        self.max_radians = math.radians(abs(float(rotate_degrees)))
        self.rotate_prob, self.flip_prob, self.zoom_prob = rotate_prob, flip_prob, zoom_prob
        self.zoom_range = (min_zoom, max_zoom)
        self.padding_mode = padding_mode
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """This augmentation's random stream on ``device``, seeded on first use."""
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def sample_parameters(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Independent random parameters for ``n`` images: angle (radians, 0 when not rotated),
        zoom (1 when not zoomed) and flip (``(n, 2)`` booleans, one per spatial axis); with colour
        jitter, ``colour`` (``(n, 3)`` factors); with cutout, ``cutout`` (holed or not) and
        ``cutout_start`` (``(n, 2)`` uniform draws placing the hole)."""
        g = self.generator(device)
        u = torch.rand(n, 6, device=device, generator=g)  # one draw for every decision and value
        angle = (u[:, 1] * 2 - 1) * self.max_radians
        angle = torch.where(u[:, 0] < self.rotate_prob, angle, torch.zeros_like(angle))
        min_zoom, max_zoom = self.zoom_range
        zoom = min_zoom + u[:, 3] * (max_zoom - min_zoom)
        zoom = torch.where(u[:, 2] < self.zoom_prob, zoom, torch.ones_like(zoom))
        flip = u[:, 4:6] < self.flip_prob
        params = {"angle": angle, "zoom": zoom, "flip": flip}
        if any(self.colour_strengths):  # drawn after the spatial ones: a seed's spatial stream is unchanged
            c = torch.rand(n, 4, device=device, generator=g)
            jittered = c[:, :1] < self.colour_prob
            factors = torch.stack([_jitter_factors(c[:, i + 1], s) for i, s in enumerate(self.colour_strengths)], 1)
            params["colour"] = torch.where(jittered, factors, torch.ones_like(factors))
        if self.cutout_size:  # drawn last, for the same reason
            c = torch.rand(n, 3, device=device, generator=g)
            params["cutout"], params["cutout_start"] = c[:, 0] < self.cutout_prob, c[:, 1:]
        return params

    @staticmethod
    def matrices(params: dict[str, torch.Tensor], spatial_size: Sequence[int]) -> torch.Tensor:
        """``(n, 3, 3)`` pull matrices in pixel (array-index) coordinates, like MONAI's Rotate builds.

        Output pixel ``o`` samples the input at ``M @ o``, with
        ``M = shift · rotation · flip · zoom⁻¹ · shift⁻¹``: the chain rotates, then flips, then zooms,
        so pulling undoes the zoom first. ``shift`` moves the origin to the middle pixel.
        """
        angle, zoom, flip = params["angle"], params["zoom"], params["flip"]
        n, device = angle.shape[0], angle.device
        cos, sin = torch.cos(angle), torch.sin(angle)
        sign = 1.0 - 2.0 * flip.to(angle.dtype)  # -1 where flipped
        inv_zoom = 1.0 / zoom
        # rotation @ diag(sign) @ diag(1/zoom), written out: column j of the rotation scaled by sign_j / zoom
        linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        linear = linear * (sign * inv_zoom[:, None])[:, None, :]
        centre = [(s - 1) / 2 for s in spatial_size]
        m = torch.zeros(n, 3, 3, dtype=angle.dtype, device=device)
        m[:, :2, :2] = linear
        for row in range(2):  # keeps the middle pixel fixed
            m[:, row, 2] = centre[row] - (linear[:, row, 0] * centre[0] + linear[:, row, 1] * centre[1])
        m[:, 2, 2] = 1.0
        return m

    def warp(self, images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        """Resample each image of a ``(N, C, H, W)`` batch through its pull matrix (from ``matrices``).

        grid_sample works in normalised (x, y) coordinates, -1 and 1 at the outer pixel edges
        (``align_corners=False``): pixel index ``i = h n + c`` with ``h = size / 2`` and
        ``c = (size - 1) / 2`` on each axis, so the normalised pull is ``h⁻¹ (M (h n + c) - c)``,
        then reversed from (row, column) to (x, y) order.
        """
        half = [s / 2 for s in images.shape[2:]]
        centre = [(s - 1) / 2 for s in images.shape[2:]]
        theta = torch.empty(matrices.shape[0], 2, 3, dtype=matrices.dtype, device=matrices.device)
        for row in range(2):
            pulled_centre = sum(matrices[:, row, k] * centre[k] for k in range(2)) + matrices[:, row, 2]
            for col in range(2):
                theta[:, 1 - row, 1 - col] = matrices[:, row, col] * (half[col] / half[row])
            theta[:, 1 - row, 2] = (pulled_centre - centre[row]) / half[row]
        grid = torch.nn.functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        return torch.nn.functional.grid_sample(
            images, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """A new batch: each image warped by its own random rotation, flips and zoom, then colour-jittered
        and holed."""
        if images.ndim != 4:
            raise ValueError(f"BatchAugmentation expects a (N, C, H, W) batch, got shape {tuple(images.shape)}")
        params = self.sample_parameters(images.shape[0], images.device)
        images = self.warp(images, self.matrices(params, images.shape[2:]))
        if "colour" in params:
            images = colour_jitter(images, *params["colour"].unbind(1))
        if "cutout" in params:
            size = cutout_pixels(self.cutout_size, images.shape[2:])
            images = cutout(images, params["cutout"], params["cutout_start"], size)
        return images
