"""Random spatial augmentation of a whole batch on its device, in one warp.

The per-sample chain in train.json runs MONAI's RandRotated, RandFlipd (both axes) and RandZoomd on
each image in a loader worker. ``BatchAugmentation`` does what that chain does to every image of a
batch at once: each image draws its own parameters with the same probabilities and ranges, the
rotation, flips and zoom are composed into one affine matrix per image in the same order as the
chain (rotate, flip, zoom), and one ``grid_sample`` resamples the batch with them. The matrices
follow MONAI's own ``Rotate`` convention (pull direction, array-index order, centred on the middle
pixel), so an angle means what it means to RandRotated.

Elastic deformation follows MONAI's ``Rand2DElasticd`` (the chain runs it after the zoom): a coarse grid
of control points, each displaced by a normal draw scaled by a magnitude drawn per image, upsampled
bicubically to every pixel; here the displacement joins the rotation, flips and zoom in the same one
resampling. Cutout (one square-ish hole of black per image, ``cutout``) follows MONAI's ``RandCoarseDropoutd``,
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


def elastic_pixels(fraction: float, spatial_size: Sequence[int]) -> list[int]:
    """The elastic control points' spacing in pixels: ``fraction`` of each side, at least 2 pixels."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"augmentation elastic_spacing must be a fraction of the side in (0, 1], got {fraction}")
    return [max(2, round(float(fraction) * int(side))) for side in spatial_size]


def _control_points(side: int, spacing: int) -> int:
    """How many control points MONAI's ``create_control_grid`` lays along a side (a margin beyond each edge)."""
    if side % 2 == 0:
        return int(math.ceil((side - 1.0) / (2.0 * spacing) + 0.5) * 2 + 2)
    return int(math.ceil((side - 1.0) / (2.0 * spacing)) * 2 + 3)


def elastic_displacement(
    magnitudes: torch.Tensor, spatial_size: Sequence[int], spacing: Sequence[int], generator: torch.Generator
) -> torch.Tensor:
    """``(N, 2, H, W)`` pixel displacements (rows, columns), one smooth random field per image.

    As MONAI's ``Rand2DElastic``: a normal draw at each control point times the image's magnitude,
    upsampled by the spacing with bicubic interpolation and cropped to the image's centre.
    """
    counts = [_control_points(int(side), int(step)) for side, step in zip(spatial_size, spacing, strict=True)]
    offsets = torch.randn(
        magnitudes.shape[0], 2, *counts, device=magnitudes.device, dtype=magnitudes.dtype, generator=generator
    )
    dense = torch.nn.functional.interpolate(
        offsets * magnitudes.reshape(-1, 1, 1, 1),
        scale_factor=[float(step) for step in spacing],
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=True,
    )
    starts = [(full - int(side)) // 2 for full, side in zip(dense.shape[2:], spatial_size, strict=True)]
    return dense[:, :, starts[0] : starts[0] + int(spatial_size[0]), starts[1] : starts[1] + int(spatial_size[1])]


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
        elastic_magnitude: the largest standard deviation of the elastic control points' displacement,
            as a fraction of the image's shorter side; a deformed image draws its own uniformly up to
            it. 0: no elastic deformation.
        elastic_spacing: the control points' spacing as a fraction of each side (see ``elastic_pixels``).
        elastic_prob: probability that an image is elastically deformed.
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
        elastic_magnitude: float = 0.0,
        elastic_spacing: float = 0.25,
        elastic_prob: float = 0.5,
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
            ("elastic_prob", elastic_prob),
        ):
            _check_prob(name, p)
        if float(elastic_magnitude) < 0:
            raise ValueError(f"augmentation elastic_magnitude must be 0 (off) or positive, got {elastic_magnitude}")
        elastic_pixels(elastic_spacing, [1])
        self.elastic_magnitude, self.elastic_spacing = float(elastic_magnitude), float(elastic_spacing)
        self.elastic_prob = elastic_prob
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
        ``cutout_start`` (``(n, 2)`` uniform draws placing the hole); with elastic deformation,
        ``elastic`` (each image's magnitude as a fraction of its shorter side, 0 when not deformed)."""
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
        if self.cutout_size:  # drawn after the colour ones, for the same reason
            c = torch.rand(n, 3, device=device, generator=g)
            params["cutout"], params["cutout_start"] = c[:, 0] < self.cutout_prob, c[:, 1:]
        if self.elastic_magnitude:  # the same again; the field itself is drawn in __call__, knowing the size
            e = torch.rand(n, 2, device=device, generator=g)
            params["elastic"] = torch.where(e[:, 0] < self.elastic_prob, e[:, 1] * self.elastic_magnitude, 0.0)
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

    def warp(
        self, images: torch.Tensor, matrices: torch.Tensor, displacement: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Resample each image of a ``(N, C, H, W)`` batch through its pull matrix (from ``matrices``),
        after its ``(N, 2, H, W)`` pixel ``displacement`` if given: output pixel ``o`` samples the
        input at ``M (o + d(o))``.

        grid_sample takes normalised (x, y) coordinates, -1 and 1 at the outer pixel edges
        (``align_corners=False``): pixel index ``i`` is ``(i - (size - 1) / 2) / (size / 2)``.
        """
        n, _, height, width = images.shape
        rows = torch.arange(height, device=images.device, dtype=matrices.dtype).reshape(1, height, 1)
        cols = torch.arange(width, device=images.device, dtype=matrices.dtype).reshape(1, 1, width)
        if displacement is not None:
            rows, cols = rows + displacement[:, 0], cols + displacement[:, 1]
        m = matrices[:, :2, :, None, None]
        pulled = [m[:, r, 0] * rows + m[:, r, 1] * cols + m[:, r, 2] for r in range(2)]
        normalised = [(p - (side - 1) / 2) / (side / 2) for p, side in zip(pulled, (height, width), strict=True)]
        grid = torch.stack([normalised[1], normalised[0]], -1).expand(n, height, width, 2)  # (x, y) order
        return torch.nn.functional.grid_sample(
            images, grid.to(images.dtype), mode="bilinear", padding_mode=self.padding_mode, align_corners=False
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """A new batch: each image warped by its own random rotation, flips, zoom and elastic
        deformation, then colour-jittered and holed."""
        if images.ndim != 4:
            raise ValueError(f"BatchAugmentation expects a (N, C, H, W) batch, got shape {tuple(images.shape)}")
        params = self.sample_parameters(images.shape[0], images.device)
        size = images.shape[2:]
        displacement = None
        if "elastic" in params:
            spacing = elastic_pixels(self.elastic_spacing, size)
            magnitudes = params["elastic"] * min(size)
            displacement = elastic_displacement(magnitudes, size, spacing, self.generator(images.device))
        images = self.warp(images, self.matrices(params, size), displacement)
        if "colour" in params:
            images = colour_jitter(images, *params["colour"].unbind(1))
        if "cutout" in params:
            images = cutout(images, params["cutout"], params["cutout_start"], cutout_pixels(self.cutout_size, size))
        return images
