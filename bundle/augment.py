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

A random resized crop (``crop_scale``, ``crop_ratio``: torchvision's ``RandomResizedCrop``, batch-only)
joins the same one warp: the crop is the last factor of each pull matrix.

Mixup and CutMix (``BatchMix``, batch-only) mix each image of a batch with another of the same batch
and its label with the other's, so the labels become soft ``(N, C)`` targets.

Colour jitter (brightness, contrast, saturation: dermoscopes differ in light and white balance) is
one function, ``colour_jitter``, that both paths call: ``BatchAugmentation`` on the whole batch and
``RandColourJitterd`` (a MONAI transform for the per-sample chain) on one image at a time.
"""

import math
from collections.abc import Sequence

import numpy as np
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


class DeviceGenerators:
    """One ``torch.Generator`` per device, each seeded with ``seed`` on first use: ``generators(device)``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(device): generator.get_state() for device, generator in self._generators.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        """Restores the streams of the devices this process has (a GPU run's checkpoint resumed on a CPU starts
        the CPU's stream afresh)."""
        for name, state in states.items():
            device = torch.device(name)
            if device.type == "cpu" or (device.type == "cuda" and torch.cuda.device_count() > (device.index or 0)):
                self(device).set_state(state.cpu())  # the checkpoint may have been loaded onto the GPU


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
        crop_scale: [min, max] area of a random resized crop, as a fraction of the image's; every image
            is cropped to an area drawn uniformly from it, then resized back ([1, 1]: no crop).
        crop_ratio: [min, max] of the crop's aspect ratio (width / height, relative to the image's),
            drawn log-uniformly and narrowed where needed so that the crop fits inside the image.
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
        crop_scale: Sequence[float] = (1.0, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
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
        self.crop_scale = tuple(float(a) for a in crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(
                f"config key 'augment#crop_scale' must be [min, max] with 0 < min <= max <= 1, got {crop_scale}"
            )
        self.crop_ratio = tuple(float(r) for r in crop_ratio)
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(
                f"config key 'augment#crop_ratio' must be [min, max] with 0 < min <= max, got {crop_ratio}"
            )
        min_zoom, max_zoom = (float(z) for z in zoom_range)
        if not 0 < min_zoom <= max_zoom:
            raise ValueError(f"augmentation zoom_range must be 0 < min <= max, got {list(zoom_range)}")
        self.max_radians = math.radians(abs(float(rotate_degrees)))
        self.rotate_prob, self.flip_prob, self.zoom_prob = rotate_prob, flip_prob, zoom_prob
        self.zoom_range = (min_zoom, max_zoom)
        self.padding_mode = padding_mode
        self.generator = DeviceGenerators(seed)  # generator(device): this augmentation's random stream there

    def random_state(self) -> dict:
        """Where its random streams are (for a resume checkpoint: ``bundle.handlers.RandomStates``)."""
        return {"torch": self.generator.state_dict()}

    def set_random_state(self, state: dict) -> None:
        self.generator.load_state_dict(state["torch"])

    def sample_parameters(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Independent random parameters for ``n`` images: angle (radians, 0 when not rotated),
        zoom (1 when not zoomed) and flip (``(n, 2)`` booleans, one per spatial axis); with colour
        jitter, ``colour`` (``(n, 3)`` factors); with cutout, ``cutout`` (holed or not) and
        ``cutout_start`` (``(n, 2)`` uniform draws placing the hole); with elastic deformation,
        ``elastic`` (each image's magnitude as a fraction of its shorter side, 0 when not deformed); with
        a random resized crop, ``crop`` (``(n, 2)`` sides as fractions of the image's, rows then columns)
        and ``crop_offset`` (``(n, 2)`` the crop's centre from the image's, as fractions of each side)."""
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
        if self.crop_scale != (1.0, 1.0):  # the same again
            c = torch.rand(n, 4, device=device, generator=g)
            low, high = self.crop_scale
            area = low + c[:, 0] * (high - low)
            log_low, log_high = (math.log(r) for r in self.crop_ratio)
            # |log ratio| <= -log area keeps both sides <= 1: the crop fits, and has exactly the drawn area
            bound = -torch.log(area)
            log_ratio = torch.minimum(torch.maximum(log_low + c[:, 1] * (log_high - log_low), -bound), bound)
            sides = torch.stack([torch.sqrt(area / log_ratio.exp()), torch.sqrt(area * log_ratio.exp())], 1)
            params["crop"], params["crop_offset"] = sides, (c[:, 2:] - 0.5) * (1 - sides)
        return params

    @staticmethod
    def matrices(params: dict[str, torch.Tensor], spatial_size: Sequence[int]) -> torch.Tensor:
        """``(n, 3, 3)`` pull matrices in pixel (array-index) coordinates, like MONAI's Rotate builds.

        Output pixel ``o`` samples the input at ``M @ o``, with
        ``M = shift · rotation · flip · zoom⁻¹ · shift⁻¹``: the chain rotates, then flips, then zooms,
        so pulling undoes the zoom first. ``shift`` moves the origin to the middle pixel. A random
        resized crop comes first (``crop`` in ``params``): ``M = shift · offset · crop · rotation · ...``,
        pulling from the crop (its sides' fractions on the diagonal, moved by its offset).
        """
        angle, zoom, flip = params["angle"], params["zoom"], params["flip"]
        n, device = angle.shape[0], angle.device
        cos, sin = torch.cos(angle), torch.sin(angle)
        sign = 1.0 - 2.0 * flip.to(angle.dtype)  # -1 where flipped
        inv_zoom = 1.0 / zoom
        # rotation @ diag(sign) @ diag(1/zoom), written out: column j of the rotation scaled by sign_j / zoom
        linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        linear = linear * (sign * inv_zoom[:, None])[:, None, :]
        offset = [0.0, 0.0]
        if "crop" in params:
            linear = linear * params["crop"][:, :, None]  # crop @ linear: row r scaled by the crop's side r
            offset = [params["crop_offset"][:, r] * int(spatial_size[r]) for r in range(2)]
        centre = [(s - 1) / 2 for s in spatial_size]
        m = torch.zeros(n, 3, 3, dtype=angle.dtype, device=device)
        m[:, :2, :2] = linear
        for row in range(2):  # keeps the middle pixel fixed
            m[:, row, 2] = centre[row] + offset[row] - (linear[:, row, 0] * centre[0] + linear[:, row, 1] * centre[1])
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
        """A new batch: each image warped by its own random crop, rotation, flips, zoom and elastic
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


def _check_alpha(name: str, alpha: float) -> float:
    if not float(alpha) >= 0.0:
        raise ValueError(f"config key 'augment#{name}' must be 0 (off) or positive, got {alpha}")
    return float(alpha)


class BatchMix:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of a ``(N, C, H, W)`` batch and its labels.

    With probability ``mix_prob`` a batch is mixed: every image with the image a random permutation
    pairs it with, by one weight ``lam ~ Beta(alpha, alpha)`` for the whole batch. Mixup blends the two
    images; CutMix pastes a box of about ``1 - lam`` of the area from the partner (and ``lam`` becomes
    the exact area kept). With both alphas set, each mixed batch is one or the other at even odds. The
    labels become ``lam * onehot(label) + (1 - lam) * onehot(partner's label)``; labels that are already
    soft ``(N, num_classes)`` rows (distillation's, ``bundle.distill``) are mixed as they are.

    Once mixing is on, every batch's labels are float ``(N, num_classes)`` soft targets, unmixed
    batches' too (one-hot): a captured (CUDA graph) step needs one label shape and dtype per run.
    The decisions, ``lam`` and the box are drawn on the CPU as Python numbers (a seeded numpy
    generator) and the permutation on the batch's device: nothing is read back from the device.

    Args:
        num_classes: the soft targets' width.
        mixup_alpha: Beta parameter of mixup's weight; 0: no mixup.
        cutmix_alpha: Beta parameter of CutMix's weight; 0: no CutMix.
        mix_prob: probability that a batch is mixed.
        seed: seeds both generators.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.num_classes = int(num_classes)
        self.mixup_alpha = _check_alpha("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = _check_alpha("cutmix_alpha", cutmix_alpha)
        if not 0.0 <= float(mix_prob) <= 1.0:
            raise ValueError(f"config key 'augment#mix_prob' must be in [0, 1], got {mix_prob}")
        self.mix_prob = float(mix_prob)
        self.rng = np.random.default_rng(seed)  # the mix drawn for each batch
        self.generator = DeviceGenerators(seed)  # generator(device): the pairing of images there

    @property
    def enabled(self) -> bool:
        """Whether this mixes at all (and so turns labels into soft targets)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def random_state(self) -> dict:
        """Where its random streams are (for a resume checkpoint: ``bundle.handlers.RandomStates``)."""
        return {"torch": self.generator.state_dict(), "numpy": self.rng.bit_generator.state}

    def set_random_state(self, state: dict) -> None:
        self.generator.load_state_dict(state["torch"])
        self.rng.bit_generator.state = state["numpy"]

    def draw(self, spatial_size: Sequence[int]) -> tuple[str, float, tuple[int, int, int, int] | None]:
        """This batch's mix as Python numbers: ``(kind, lam, box)``; kind is "none", "mixup" or
        "cutmix"; box ``(row0, row1, col0, col1)`` is the pasted region (CutMix only)."""
        kinds = [k for k, a in (("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha)) if a > 0]
        mixed = self.rng.random() < self.mix_prob
        kind = kinds[int(self.rng.integers(len(kinds)))] if kinds else "none"
        if not mixed or kind == "none":
            return "none", 1.0, None
        lam = float(self.rng.beta(*(2 * [self.mixup_alpha if kind == "mixup" else self.cutmix_alpha])))
        if kind == "mixup":
            return kind, lam, None
        height, width = (int(side) for side in spatial_size)
        cut = math.sqrt(1.0 - lam)  # the box's side as a fraction of the image's
        box = []
        for side in (height, width):
            half, middle = int(side * cut) // 2, int(self.rng.integers(side))
            box += [min(max(middle - half, 0), side), min(max(middle + half, 0), side)]
        row0, row1, col0, col1 = box
        return kind, 1.0 - (row1 - row0) * (col1 - col0) / (height * width), (row0, row1, col0, col1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, targets)``: the batch mixed (or not) and float ``(N, num_classes)`` targets; ``labels``
        are class indices ``(N,)`` or soft rows ``(N, num_classes)``."""
        device = images.device
        if labels.ndim == 2:
            targets = labels.float()
        else:  # one-hot by comparison: F.one_hot checks the labels' range with a read back on some devices
            targets = (labels.reshape(-1, 1) == torch.arange(self.num_classes, device=labels.device)).float()
        perm = torch.randperm(images.shape[0], device=device, generator=self.generator(device))
        kind, lam, box = self.draw(images.shape[2:])
        if kind == "none":
            return images, targets
        if kind == "mixup":
            images = images * lam + images[perm] * (1.0 - lam)
        else:
            row0, row1, col0, col1 = box
            rows = torch.arange(images.shape[2], device=device)
            cols = torch.arange(images.shape[3], device=device)
            inside = ((rows >= row0) & (rows < row1))[:, None] & ((cols >= col0) & (cols < col1))[None, :]
            images = torch.where(inside, images[perm], images)
        return images, targets * lam + targets[perm.to(targets.device)] * (1.0 - lam)


# the batch-only augmentation keys and the value that turns each off
BATCH_ONLY = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "crop_scale": [1.0, 1.0]}


def refuse_batch_only(augment: dict, config: str) -> None:
    """The per-sample chain (``config``) has no mixup, CutMix or random resized crop: refuse them
    rather than train silently without."""
    for key, off in BATCH_ONLY.items():
        value = augment.get(key, off)
        if (list(map(float, value)) if isinstance(value, (list, tuple)) else float(value)) != off:
            raise ValueError(
                f"config key 'augment#{key}' ({value}) is only in the batched data path (train.json); "
                f"{config} runs the per-sample chain: set it to {off} or drop {config}"
            )
