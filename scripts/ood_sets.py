"""The images the out-of-distribution guard is measured on, built offline and reproducibly (seeded).

    python scripts/ood_sets.py --output_dir ood_sets [--dataset_dir D --datalist L]   # writes them as files

Far out-of-distribution (``far_*``), what a triage tool must not diagnose:

- ``far_photos``: natural photographs shipped in installed packages (scikit-image's sample data when it is
  installed: ``pip install scikit-image``; matplotlib's and scikit-learn's always), whole and as random crops,
  and face photographs (scikit-image's LFW subset);
- ``far_synthetic``: uniform colours, gradients, noise, text rendered on a plain background, chessboards;
- ``far_medical``: non-dermoscopy medical images shipped in packages: histology (immunohistochemistry),
  microscopy (cells, mitosis), retinal fundus and an MRI slice, whole and as random crops.

Near out-of-distribution (``near_*``), in-distribution test images pushed out of the domain: heavily blurred,
mostly cropped away, colour-inverted, greyscale, turned by 90 degrees onto a black canvas of the original shape.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import fire
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from bundle.data import load_datalist, preflight
from bundle.imageio import MIN_SIDE

# (file under the package's data folder, kind); missing files (another package version) are skipped
PHOTOS = {
    "skimage": [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "hubble_deep_field.jpg",
        "grass.png",
        "gravel.png",
        "brick.png",
        "coins.png",
        "moon.png",
        "camera.png",
        "horse.png",
        "clock_motion.png",
        "color.png",
        "page.png",
    ],
    "matplotlib": ["grace_hopper.jpg"],
    "sklearn": ["china.jpg", "flower.jpg"],
}
MEDICAL = {"skimage": ["ihc.png", "cell.png", "microaneurysms.png", "retina.jpg"]}
CROPS_PER_IMAGE = 5
FACES = 60
PER_SYNTHETIC_KIND = 24
NEAR_IMAGES = 300
SIZE = (200, 150)  # (width, height) of a generated frame: the dataset's own shape


def _package_data(package: str) -> Path | None:
    try:
        module = __import__(package)
    except ImportError:
        return None
    folder = {"skimage": "data", "matplotlib": "mpl-data/sample_data", "sklearn": "datasets/images"}[package]
    return Path(module.__file__).parent / folder


def _files(listing: dict[str, list[str]]) -> list[Path]:
    found = []
    for package, names in listing.items():
        folder = _package_data(package)
        found += [folder / name for name in names if folder is not None and (folder / name).is_file()]
    return found


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _with_crops(images: list[Image.Image], rng: np.random.Generator) -> Iterator[Image.Image]:
    """Each image, then random crops of it (a fifth to a half of each side)."""
    for image in images:
        yield image
        width, height = image.size
        for _ in range(CROPS_PER_IMAGE):
            w, h = (int(side * rng.uniform(0.2, 0.5)) for side in (width, height))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            yield image.crop((x, y, x + w, y + h))


def far_photos(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = list(_with_crops([_rgb(Image.open(path)) for path in _files(PHOTOS)], rng))
    folder = _package_data("skimage")
    if folder is not None and (folder / "lfw_subset.npy").is_file():
        faces = np.load(folder / "lfw_subset.npy")[:FACES]
        images += [_rgb(Image.fromarray((face * 255).astype(np.uint8))) for face in faces]
    return images


def far_medical(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = [_rgb(Image.open(path)) for path in _files(MEDICAL)]
    folder = _package_data("matplotlib")
    mri = folder / "s1045.ima.gz" if folder is not None else None
    if mri is not None and mri.is_file():  # a 256 x 256 16-bit MRI slice
        pixels = np.frombuffer(gzip.decompress(mri.read_bytes()), np.uint16).reshape(256, 256).astype(np.float64)
        images.append(_rgb(Image.fromarray((255 * pixels / pixels.max()).astype(np.uint8))))
    return list(_with_crops(images, rng))


def far_synthetic(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    width, height = SIZE
    kinds: dict[str, Callable[[], Image.Image]] = {
        "uniform": lambda: Image.new("RGB", SIZE, tuple(int(c) for c in rng.integers(0, 256, 3))),
        "gradient": lambda: Image.fromarray(_gradient(rng, width, height)),
        "noise": lambda: Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
        "text": lambda: _text(rng),
        "chessboard": lambda: Image.fromarray(_chessboard(rng, width, height)),
    }
    return [make() for make in kinds.values() for _ in range(PER_SYNTHETIC_KIND)]


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    t = xx / width * np.cos(angle) + yy / height * np.sin(angle)
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    return (start + (end - start) * t[..., None]).astype(np.uint8)


def _text(rng: np.random.Generator) -> Image.Image:
    background = tuple(int(c) for c in rng.integers(180, 256, 3))
    image = Image.new("RGB", SIZE, background)
    draw = ImageDraw.Draw(image)
    words = ["invoice", "total", "skin", "lesion", "report", "2026", "page", "error", "login", "results"]
    for line in range(int(rng.integers(3, 8))):
        text = " ".join(rng.choice(words, int(rng.integers(2, 5))))
        draw.text((int(rng.integers(2, 40)), 8 + 20 * line), text, fill=tuple(int(c) for c in rng.integers(0, 80, 3)))
    return image


def _chessboard(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    square = int(rng.integers(6, 40))
    yy, xx = np.mgrid[0:height, 0:width]
    board = ((yy // square + xx // square) % 2).astype(bool)
    dark, light = rng.integers(0, 100, 3), rng.integers(155, 256, 3)
    return np.where(board[..., None], light, dark).astype(np.uint8)


NEAR: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "near_blurred": lambda image, rng: image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 20)),
    "near_cropped": lambda image, rng: _corner(image, rng),
    "near_inverted": lambda image, rng: ImageOps.invert(image),
    "near_greyscale": lambda image, rng: ImageOps.grayscale(image).convert("RGB"),
    "near_rotated_black_borders": lambda image, rng: _turned_on_black(image),
}


def _corner(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A corner of a fifth of each side (at least what serving accepts): mostly skin, little or none of the
    lesion."""
    width, height = image.size
    w, h = max(width // 5, MIN_SIDE), max(height // 5, MIN_SIDE)
    x, y = int(rng.choice([0, width - w])), int(rng.choice([0, height - h]))
    return image.crop((x, y, x + w, y + h))


def _turned_on_black(image: Image.Image) -> Image.Image:
    """Turned by 90 degrees and fitted into a black canvas of the original shape."""
    turned = image.transpose(Image.Transpose.ROTATE_90)
    turned.thumbnail(image.size)
    canvas = Image.new("RGB", image.size)
    canvas.paste(turned, ((image.width - turned.width) // 2, (image.height - turned.height) // 2))
    return canvas


def near_sets(test_images: list[Path], seed: int = 0) -> dict[str, list[Image.Image]]:
    rng = np.random.default_rng(seed)
    chosen = [test_images[i] for i in sorted(rng.permutation(len(test_images))[:NEAR_IMAGES])]
    originals = [_rgb(Image.open(path)) for path in chosen]
    return {name: [shift(image, rng) for image in originals] for name, shift in NEAR.items()}


def build(test_images: list[Path] | None = None, seed: int = 0) -> dict[str, list[Image.Image]]:
    """Every set by name (the near ones only given the in-distribution ``test_images``)."""
    sets = {"far_photos": far_photos(seed), "far_synthetic": far_synthetic(seed), "far_medical": far_medical(seed)}
    if test_images:
        sets |= near_sets(test_images, seed)
    return sets


def jpeg(image: Image.Image) -> bytes:
    """The image as a client would send it."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def split_images(datalist: str, dataset_dir: str | None, split: str = "testing") -> list[Path]:
    if dataset_dir is None:
        raise ValueError(f"--datalist {datalist} names images relative to a dataset folder: pass --dataset_dir too")
    preflight(datalist, dataset_dir, keys=[split], labels=False)
    return [Path(item["image"]) for item in load_datalist(datalist, split, dataset_dir)]


def main(output_dir: str, dataset_dir: str | None = None, datalist: str | None = None, seed: int = 0) -> None:
    """Write every set as JPEGs under ``output_dir/<set>/`` and their counts to ``output_dir/sets.json``."""
    test_images = split_images(datalist, dataset_dir) if datalist else None
    counts = {}
    for name, images in build(test_images, seed).items():
        folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            (folder / f"{index:04d}.jpg").write_bytes(jpeg(image))
        counts[name] = len(images)
    (Path(output_dir) / "sets.json").write_text(json.dumps(counts, indent=1))
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
