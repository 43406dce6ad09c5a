"""A small fake dataset shaped like HAM10000, for tests and smoke runs without the real images.

Each class has its own lesion colour, outline and texture, strong enough for a small network to
learn in a few CPU epochs; each lesion is photographed several times (rotated, shifted, brighter or
darker), so splitting by lesion matters here just as it does on the real data.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bundle.labels import CLASS_NAMES

MARKER_FILE = "SYNTHETIC.txt"
METADATA_CSV = "HAM10000_metadata.csv"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")

HAM10000_IMAGES_PER_CLASS = {
    "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142,
}  # fmt: skip
MIN_LESIONS_PER_CLASS = 6  # so even small sets have each class in every split
JPEG_QUALITY = 90
NOISE_MARGIN = 32  # pixels of slack in the shared noise bank

LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "scalp")
SKIN_TONES = np.array([[236, 200, 176], [224, 178, 150], [198, 150, 118], [170, 120, 90]], dtype=float)


@dataclass(frozen=True)
class ClassLook:
    """How lesions of one class are drawn."""

    colour: tuple[int, int, int]  # base RGB; distinct hues carry most of the learnable signal
    outline: str  # "round", "irregular" or "blobs"
    texture: str  # "smooth", "dots" or "stripes"
    dx_types: tuple[str, ...]  # how the diagnosis was confirmed, as HAM10000 records it


CLASS_LOOKS = {
    "akiec": ClassLook((205, 95, 85), "irregular", "dots", ("histo",)),
    "bcc": ClassLook((160, 110, 175), "blobs", "smooth", ("histo",)),
    "bkl": ClassLook((185, 150, 80), "round", "stripes", ("histo", "consensus", "confocal")),
    "df": ClassLook((215, 125, 40), "round", "dots", ("histo", "consensus")),
    "mel": ClassLook((55, 45, 95), "irregular", "stripes", ("histo",)),
    "nv": ClassLook((115, 70, 40), "round", "smooth", ("follow_up", "histo", "consensus")),
    "vasc": ClassLook((200, 25, 60), "blobs", "dots", ("consensus", "histo")),
}


@dataclass(frozen=True)
class Lesion:
    """What stays the same across all images of one lesion."""

    lesion_id: str
    dx: str
    n_images: int
    colour: np.ndarray  # RGB
    skin: np.ndarray  # RGB
    radius: float  # in units of half the shorter image side
    harmonics: np.ndarray  # (k, amplitude, phase) rows perturbing a round outline
    blobs: np.ndarray  # (x, y, radius) rows, in units of ``radius``
    texture_frequency: float  # radians per lesion radius
    texture_angle: float
    metadata: dict


def generate(
    output_dir: str | os.PathLike,
    n_images: int = 1400,
    image_size: tuple[int, int] = (200, 150),
    seed: int = 0,
    images_per_lesion: tuple[int, int] = (1, 3),
) -> Path:
    """Write ``HAM10000_metadata.csv`` and ``images/<image_id>.jpg`` (``image_size`` is W x H) to ``output_dir``.

    Deterministic for ``seed``. Overwrites an earlier synthetic output but refuses any other
    non-empty folder, so real data is never clobbered.
    """
    width, height = (int(side) for side in image_size)
    low, high = (int(count) for count in images_per_lesion)
    _check_arguments(n_images, width, height, low, high)
    rng = np.random.default_rng(seed)
    lesions = _make_lesions(rng, _images_per_class(n_images, low), low, high)
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, seed=seed, n_images=n_images)
    canvas = Canvas.create(width, height, rng)
    rows = []
    progress = tqdm(total=n_images, desc="synthetic images", unit="img")
    for lesion in lesions:
        for _ in range(lesion.n_images):
            image_id = f"ISIC_{len(rows) + 1:07d}"
            channels = [Image.fromarray(channel) for channel in _draw_image(lesion, canvas, rng)]
            Image.merge("RGB", channels).save(output_dir / "images" / f"{image_id}.jpg", quality=JPEG_QUALITY)
            rows.append({"lesion_id": lesion.lesion_id, "image_id": image_id, "dx": lesion.dx, **lesion.metadata})
            progress.update()
    progress.close()
    _write_metadata(output_dir / METADATA_CSV, rows)
    return output_dir


def _check_arguments(n_images: int, width: int, height: int, low: int, high: int) -> None:
    if not 1 <= low <= high:
        raise ValueError(f"images_per_lesion must be (low, high) with 1 <= low <= high, got ({low}, {high})")
    if min(width, height) < 16:
        raise ValueError(f"image_size must be at least 16 x 16, got {width} x {height}")
    smallest = len(CLASS_NAMES) * MIN_LESIONS_PER_CLASS * low
    if n_images < smallest:
        raise ValueError(
            f"n_images must be at least {smallest} ({MIN_LESIONS_PER_CLASS} lesions of {low}+ images per class)"
        )


def _prepare_output_dir(output_dir: Path, seed: int, n_images: int) -> None:
    """Refuse foreign non-empty folders; clear an earlier synthetic output; write the marker first
    so an interrupted run is still recognised (and overwritten) next time."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / MARKER_FILE).is_file():
        raise FileExistsError(
            f"refusing to write synthetic data into {output_dir}: it is not empty and has no {MARKER_FILE} "
            "from an earlier synthetic run"
        )
    shutil.rmtree(output_dir / "images", ignore_errors=True)
    (output_dir / METADATA_CSV).unlink(missing_ok=True)  # never leave a CSV that lists other images
    (output_dir / "images").mkdir(parents=True)
    (output_dir / MARKER_FILE).write_text(
        f"Synthetic HAM10000-shaped data written by bundle/synthetic.py (seed={seed}, n_images={n_images}).\n"
        "These are drawn shapes, not lesions: use them for tests and smoke runs only.\n"
        "scripts/make_synthetic.py may overwrite this folder.\n"
    )


def _images_per_class(n_images: int, low: int) -> dict[str, int]:
    """Images per class: a floor of MIN_LESIONS_PER_CLASS lesions each, the rest in HAM10000 proportions."""
    floor = MIN_LESIONS_PER_CLASS * low
    weights = np.array([HAM10000_IMAGES_PER_CLASS[name] for name in CLASS_NAMES], dtype=float)
    share = (n_images - floor * len(CLASS_NAMES)) * weights / weights.sum()
    counts = floor + np.floor(share).astype(int)
    leftover = n_images - counts.sum()
    counts[np.argsort(-(share - np.floor(share)), kind="stable")[:leftover]] += 1  # largest remainders
    return dict(zip(CLASS_NAMES, counts.tolist(), strict=True))


def _lesion_sizes(n_images: int, low: int, high: int, rng: np.random.Generator) -> list[int]:
    """Split ``n_images`` into lesions of ``low``..``high`` images, at least MIN_LESIONS_PER_CLASS when possible."""
    fewest, most = -(-n_images // high), n_images // low
    if fewest > most:
        raise ValueError(
            f"cannot split {n_images} images into lesions of {low}..{high} images; widen images_per_lesion"
        )
    typical = round(n_images / ((low + high) / 2))
    count = max(min(max(typical, fewest), most), min(MIN_LESIONS_PER_CLASS, most))
    slots_per_lesion = high - low
    sizes = np.full(count, low)
    if slots_per_lesion:
        extra_slots = rng.choice(count * slots_per_lesion, size=n_images - count * low, replace=False)
        sizes += np.bincount(extra_slots // slots_per_lesion, minlength=count)
    return sizes.tolist()


def _make_lesions(rng: np.random.Generator, images_per_class: dict[str, int], low: int, high: int) -> list[Lesion]:
    """All lesions in a shuffled order, so ids say nothing about the class."""
    sizes_by_class = [(dx, size) for dx in CLASS_NAMES for size in _lesion_sizes(images_per_class[dx], low, high, rng)]
    order = rng.permutation(len(sizes_by_class))
    return [
        _make_lesion(f"HAM_{number:07d}", *sizes_by_class[index], rng) for number, index in enumerate(order, start=1)
    ]


def _make_lesion(lesion_id: str, dx: str, n_images: int, rng: np.random.Generator) -> Lesion:
    look = CLASS_LOOKS[dx]
    if look.outline == "round":
        harmonics = _harmonics(rng, orders=(2, 3), amplitude=(0.02, 0.08))
    elif look.outline == "irregular":
        harmonics = _harmonics(rng, orders=(3, 4, 5, 7), amplitude=(0.06, 0.16))
    else:
        harmonics = np.zeros((0, 3))
    n_blobs = int(rng.integers(3, 6)) if look.outline == "blobs" else 0
    blobs = np.column_stack(
        [rng.uniform(-0.55, 0.55, n_blobs), rng.uniform(-0.55, 0.55, n_blobs), rng.uniform(0.35, 0.55, n_blobs)]
    )
    return Lesion(
        lesion_id=lesion_id,
        dx=dx,
        n_images=n_images,
        colour=np.clip(np.array(look.colour, dtype=float) + rng.normal(0, 10, 3), 0, 255),
        skin=SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 6, 3),
        radius=float(rng.uniform(0.4, 0.7)),
        harmonics=harmonics,
        blobs=blobs,
        texture_frequency=float(rng.uniform(10, 16)),
        texture_angle=float(rng.uniform(0, np.pi)),
        metadata={
            "dx_type": str(rng.choice(look.dx_types)),
            "age": f"{5 * int(rng.integers(1, 18))}.0",
            "sex": str(rng.choice(["male", "female"])),
            "localization": str(rng.choice(LOCALIZATIONS)),
        },
    )


def _harmonics(rng: np.random.Generator, orders: tuple[int, ...], amplitude: tuple[float, float]) -> np.ndarray:
    return np.column_stack([orders, rng.uniform(*amplitude, len(orders)), rng.uniform(0, 2 * np.pi, len(orders))])


@dataclass(frozen=True)
class Canvas:
    """What every image shares: centred pixel coordinates (in units of half the shorter side),
    a dermoscope-like vignette, and a bank of sensor noise that each image crops at random."""

    x: np.ndarray
    y: np.ndarray
    vignette: np.ndarray
    noise: np.ndarray  # (3, H + NOISE_MARGIN, W + NOISE_MARGIN); cropping it is far cheaper than drawing anew

    @classmethod
    def create(cls, width: int, height: int, rng: np.random.Generator) -> Canvas:
        half = min(width, height) / 2
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        x, y = (x - width / 2) / half, (y - height / 2) / half
        vignette = np.clip(1.15 - 0.25 * (x**2 + y**2), 0.4, 1.0)
        noise = 5 * rng.standard_normal((3, height + NOISE_MARGIN, width + NOISE_MARGIN), dtype=np.float32)
        return cls(x, y, vignette, noise)

    def noise_crop(self, rng: np.random.Generator) -> np.ndarray:
        top, left = rng.integers(0, NOISE_MARGIN + 1, 2)
        return self.noise[:, top : top + self.x.shape[0], left : left + self.x.shape[1]]


def _draw_image(lesion: Lesion, canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """One view of ``lesion``: random rotation, shift, scale and exposure; returns (3, H, W) uint8.

    Works channel-first in float32: broadcasting over a trailing axis of 3 is several times slower.
    """
    shift_x, shift_y = rng.uniform(-0.15, 0.15, 2).tolist()
    angle = rng.uniform(0, 2 * np.pi)
    scale = lesion.radius * rng.uniform(0.9, 1.1)
    # Lesion-local coordinates: the outline and texture turn and move with the lesion.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    x0, y0 = canvas.x - shift_x, canvas.y - shift_y
    x, y = x0 * cos + y0 * sin, y0 * cos - x0 * sin
    alpha = _lesion_alpha(lesion, x, y, edge=0.08 / scale)
    shade = _texture_shade(CLASS_LOOKS[lesion.dx].texture, lesion, x, y)
    skin = _per_channel(lesion.skin) * canvas.vignette
    pixels = skin + alpha * (_per_channel(lesion.colour) * shade - skin)
    pixels *= rng.uniform(0.88, 1.12)
    pixels += canvas.noise_crop(rng)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _norm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean length; several times faster than np.hypot, which guards against overflow we cannot have."""
    return np.sqrt(x * x + y * y)


def _per_channel(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32)[:, None, None]


def _lesion_alpha(lesion: Lesion, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Lesion coverage in [0, 1] with a soft border ``edge`` wide (in lesion units)."""
    if len(lesion.blobs):
        distances = [_norm(x - bx, y - by) - r for bx, by, r in lesion.blobs.tolist()]
        return np.clip(-np.minimum.reduce(distances) / edge, 0, 1)
    theta = np.arctan2(y, x)
    outline = 1 + sum(a * np.cos(k * theta + phase) for k, a, phase in lesion.harmonics.tolist())
    return np.clip((outline - _norm(x, y)) / edge, 0, 1)


def _texture_shade(texture: str, lesion: Lesion, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brightness multiplier over the lesion: darker centre, plus the class's dots or stripes."""
    shade = 1.1 - 0.25 * np.clip(1 - _norm(x, y), 0, 1)
    frequency, angle = lesion.texture_frequency, lesion.texture_angle
    if texture == "dots":
        shade -= 0.35 * (np.sin(x * frequency) * np.sin(y * frequency) > 0.5).astype(np.float32)
    elif texture == "stripes":
        shade -= 0.3 * (np.sin((x * math.cos(angle) + y * math.sin(angle)) * frequency) > 0.3).astype(np.float32)
    return shade


def _write_metadata(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
