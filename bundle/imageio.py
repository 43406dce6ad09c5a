"""Decode any sound image to 8-bit RGB at a bounded cost, and say in words why a file cannot be used.

``ShrinkingPILReader`` is the reader ``configs/inference.json``'s preprocessing hands to MONAI's
``LoadImaged``, so training, evaluation, the cache and serving decode every image the same way:

1. refuse from the header, before decoding any pixel, shapes nothing useful can come of: a side
   under ``MIN_SIDE`` pixels, an aspect ratio over ``MAX_ASPECT_RATIO``, a PNG whose header claims more
   pixels than its bytes can hold (``png_size_problem``), more pixels than Pillow's bomb limit;
2. decode a JPEG at 1/2, 1/4 or 1/8 scale in libjpeg itself (``draft``) when it stays at least four
   times ``image_size`` on both sides: a 4000 x 3000 phone photo decodes as 500 x 375 for 64 x 64;
3. turn the picture upright by its EXIF orientation tag (``upright``): a phone photo sent upright is
   seen upright, in training and serving alike;
4. convert to 8-bit RGB (``to_rgb``: grey, palette, alpha, CMYK and 16-bit);
5. shrink in 8 bits each side at least four times its target to exactly twice it (``shrunk_size``),
   by area-weighted box resampling (``Image.resize(BOX)``, which weighs partial pixels at the edges,
   unlike ``Image.reduce``, whose partial last box would shift the picture by up to a reduced pixel).

Every float step (0-1 scaling, the area-averaged ``Resized`` to ``image_size``) then runs on that
small 8-bit image, and the ``Resized`` itself is unchanged: from exactly twice the target it averages
2 x 2 blocks, so the two steps together are an area average of the decoded picture, rounded once to
8 bits in between. Sides under four times the target are left to ``Resized`` as before: HAM10000's
200 x 150 copies decode exactly as before at 64 and 128 px; its 600 x 450 originals are shrunk to
128 x 128 for 64 px, and to 256 x 450 for 128 px.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import MapTransform
from monai.utils import ensure_tuple
from PIL import Image, UnidentifiedImageError

# A side this short holds too little of a lesion to classify (the network sees 32-64 px).
MIN_SIDE = 16
# Dermoscopy and phone photos are 4:3 to about 2:1; beyond 10:1 the resize squashes a strip into a square.
MAX_ASPECT_RATIO = 10
# Deflate cannot expand its input more than 1032-fold, and a PNG row holds at least one bit a pixel
# plus a filter byte: a PNG's file size bounds the pixels it can really hold.
DEFLATE_MAX_RATIO = 1032
# A shrunk side is this many times its target, so the area resize after it averages whole 2 x 2 blocks.
SHRINK_MARGIN = 2

# Modes whose pixels have a defined colour meaning that Pillow converts to RGB losslessly enough.
_DIRECT_RGB_MODES = frozenset({"L", "1", "P", "CMYK", "YCbCr", "RGBX"})
# Modes with an alpha channel: transparent pixels are composited onto white (see _flatten_alpha).
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
# Grayscale integer modes holding 16-bit data (Pillow opens 16-bit PNGs as "I;16"; older versions as "I").
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
# EXIF orientation -> the transpose that makes the picture upright (as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})


class EncodedImage:
    """An image file's bytes held in memory, for ``LoadImage``: it passes anything that is not a string,
    bytes or an iterable (a ``BytesIO`` iterates its lines) to the reader as one item, and puts ``str()``
    of it in the metadata, so this has a short name rather than the bytes' repr."""

    __slots__ = ("data", "name")

    def __init__(self, data: bytes, name: str = "<in-memory image>") -> None:
        self.data, self.name = data, name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


class UnusableImage(ValueError):
    """An image the bundle will not classify; the message says why, in words a client can act on."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB; raise ``ValueError`` for modes without a sound conversion.

    Float ("F") images and anything not listed above are refused rather than guessed at: their
    value range is not defined, and a silent wrong scaling would look like a valid lesion photo.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if mode in _DIRECT_RGB_MODES:
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    raise ValueError(f"unsupported image mode {mode!r}")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite onto white: dermoscopy backgrounds are bright, and transparent pixels usually carry
    meaningless colour values (often black) that would read as a dark lesion if alpha were dropped."""
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba)  # = alpha_composite onto opaque white, for every colour and alpha, without 3 copies
    return flat


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit values to 8 bits by their top byte (65535 -> 255, 32768 -> 128), never by clipping."""
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise ValueError(f"unsupported image mode {image.mode!r}: values {values.min()}..{values.max()} exceed 16 bits")
    gray = (values >> 8).astype(np.uint8)  # in the array's own integer type: no 8-byte-a-pixel copy
    return Image.fromarray(gray, mode="L").convert("RGB")


def shape_problem(width: int, height: int) -> str | None:
    """Why a ``width`` x ``height`` image is not worth decoding, naming the limit; None when it is."""
    if min(width, height) < MIN_SIDE:
        return f"image too small: {width} x {height} pixels; each side must be at least {MIN_SIDE} pixels to classify"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (
            f"image too elongated: {width} x {height} pixels has an aspect ratio of "
            f"{max(width, height) / min(width, height):.0f}:1, over the limit of {MAX_ASPECT_RATIO}:1"
        )
    return None


def png_size_problem(width: int, height: int, n_bytes: int) -> str | None:
    """Why a PNG of ``n_bytes`` cannot hold the ``width`` x ``height`` pixels its header claims, or None.

    A lower bound, so never wrong about a real PNG: every row is a filter byte and at least one bit a
    pixel, and deflate expands its input at most ``DEFLATE_MAX_RATIO``-fold.
    """
    least_raw = height * (1 + math.ceil(width / 8))
    if n_bytes * DEFLATE_MAX_RATIO < least_raw:
        return (
            f"corrupt PNG: its header claims {width} x {height} pixels, which need at least "
            f"{math.ceil(least_raw / DEFLATE_MAX_RATIO)} bytes, but the file holds {n_bytes}"
        )
    return None


def header_problem(image: Image.Image, n_bytes: int) -> str | None:
    """Why an opened (not yet decoded) image of ``n_bytes`` bytes is refused from its header, or None."""
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        # checked here rather than through Pillow's warning: warning filters are process-wide, not thread-safe
        return f"image too large: {width * height} pixels exceeds the decompression-bomb limit {Image.MAX_IMAGE_PIXELS}"
    problem = shape_problem(width, height)
    if problem is None and image.format == "PNG":
        problem = png_size_problem(width, height, n_bytes)
    return problem


def shrunk_size(width: int, height: int, image_size: Sequence[int]) -> tuple[int, int]:
    """The size an image is shrunk to in 8 bits: each side at least twice ``SHRINK_MARGIN`` times its target
    (``image_size`` is [height, width]) comes down to exactly ``SHRINK_MARGIN`` times it; the others stay."""
    target_height, target_width = image_size
    return (
        SHRINK_MARGIN * target_width if width >= 2 * SHRINK_MARGIN * target_width else width,
        SHRINK_MARGIN * target_height if height >= 2 * SHRINK_MARGIN * target_height else height,
    )


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8), 1 when absent or unreadable: a broken EXIF block is common in
    otherwise sound photos, and the stored orientation is then the only one known."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # Pillow raises a variety of errors for corrupt EXIF blocks
        return 1
    return value if value in _UPRIGHT else 1


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned the way its EXIF orientation tag says it is meant to be seen."""
    method = _UPRIGHT.get(orientation(image))
    return image if method is None else image.transpose(method)


def load_rgb(
    source: str | os.PathLike | EncodedImage | bytes | io.BytesIO, image_size: Sequence[int] | None = None
) -> Image.Image:
    """Decode ``source`` (a path, bytes or a binary stream) upright as 8-bit RGB, shrunk in 8 bits for
    ``image_size`` ([height, width]) when one is given (see the module docstring).

    Raises ``UnusableImage`` saying what is wrong, for every way a file can be unusable.
    """
    if isinstance(source, EncodedImage):
        source = source.data
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        image = Image.open(source)
    except UnidentifiedImageError:
        raise UnusableImage("not an image file Pillow can identify") from None
    except Image.DecompressionBombError as error:
        raise UnusableImage(f"image too large: {error}") from None
    except MemoryError:
        raise
    except Exception as error:  # corrupt headers raise OSError, SyntaxError, ValueError, struct.error, ...
        raise UnusableImage(f"cannot decode: unreadable image header ({error})") from None
    try:
        problem = header_problem(image, _size_in_bytes(source))
        if problem:
            raise UnusableImage(problem)
        if image_size is not None and image.format in ("JPEG", "MPO"):
            height, width = _stored(image_size, image)
            if image.width >= 4 * SHRINK_MARGIN * width and image.height >= 4 * SHRINK_MARGIN * height:
                # libjpeg decodes at the smallest of 1/2, 1/4, 1/8 that stays at least 2 x this size
                image.draft(None, (2 * SHRINK_MARGIN * width, 2 * SHRINK_MARGIN * height))
        _decode(image)
        rgb = to_rgb(upright(image))
        if image_size is not None and (size := shrunk_size(*rgb.size, image_size)) != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BOX)  # area-weighted, the edges' partial pixels included
    except UnusableImage:
        image.close()
        raise
    except ValueError as error:  # to_rgb's unsupported modes
        image.close()
        raise UnusableImage(str(error)) from None
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        image.close()
        raise UnusableImage(f"cannot decode: {error}") from None
    if rgb is not image:
        image.close()
    return rgb


def _decode(image: Image.Image) -> None:
    """``image.load()``, every error of a corrupt file reported as ``UnusableImage``."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as error:  # truncation is an OSError; other corruption raises SyntaxError, struct.error, ...
        raise UnusableImage(f"cannot decode: {error}") from None


def _stored(image_size: Sequence[int], image: Image.Image) -> Sequence[int]:
    """``image_size`` ([height, width], upright) in the orientation ``image`` is stored in."""
    return image_size[::-1] if orientation(image) in _SWAPS_SIDES else image_size


def _size_in_bytes(source) -> int:
    if isinstance(source, io.BytesIO):
        return source.getbuffer().nbytes
    if isinstance(source, (str, os.PathLike)):
        return os.stat(source).st_size
    position = source.seek(0, io.SEEK_END)
    source.seek(0)
    return position


class ShrinkingPILReader(PILReader):
    """MONAI's ``PILReader`` decoding through ``load_rgb`` at the bundle's ``image_size``.

    ``read`` accepts paths and ``EncodedImage`` (the server classifies request bodies in memory, with
    no temporary file). It never raises: ``LoadImage`` falls back to its default readers when the one
    it was given raises in ``read``, and those would decode a refused image anyway, at full size and
    unconverted. ``get_data`` raises ``UnusableImage`` instead, which ``LoadImage`` passes on.
    """

    def __init__(self, image_size: Sequence[int] | None = None, reverse_indexing: bool = False, **kwargs) -> None:
        super().__init__(converter=None, reverse_indexing=reverse_indexing, **kwargs)
        self.image_size = None if image_size is None else [int(side) for side in image_size]
        self.decode = load_rgb  # an attribute, so the cache fingerprint (bundle.cache.describe) hashes its source

    def read(self, data, **kwargs):
        images = []
        for name in ensure_tuple(data):
            try:
                images.append(self.decode(name, self.image_size))
            except UnusableImage as error:
                images.append(error)
            except OSError as error:  # a missing or unreadable file
                images.append(UnusableImage(f"cannot read {name}: {error.strerror or error}"))
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        for image in ensure_tuple(img):
            if isinstance(image, UnusableImage):
                raise image
        return super().get_data(img)


def decode_problem(path: str | os.PathLike | bytes) -> str | None:
    """Fully decode ``path`` (or bytes) the way training will; return a short reason it cannot be used, or None.

    Safe to call from worker threads: the decompression-bomb limit is checked from the header directly
    rather than by turning Pillow's warning into an error, because warning filters are process-wide.
    """
    if not isinstance(path, (bytes, bytearray)):
        path = Path(path)
        try:
            if path.stat().st_size == 0:
                return "file is empty"
        except FileNotFoundError:
            return "file not found"
        except OSError as error:
            return f"cannot read: {error.strerror or error}"
    elif not path:
        return "file is empty"
    try:
        load_rgb(path)
    except UnusableImage as error:
        return str(error)
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    return None


class EightBitLevelsd(MapTransform):
    """Rounds 0-1 images to the 256 levels of 8 bits (``k / 255``), last in the preprocessing. The image cache
    stores images as uint8, so with this step the cached data path (training, validation, evaluation), the chain,
    batch inference and serving all give the network the very same values; without it serving's differed from
    evaluation's by up to half a grey level, enough to move an answer across a fitted threshold now and then."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.round(torch.as_tensor(d[key]) * 255) / 255
        return d
