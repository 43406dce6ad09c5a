"""Decode any sound image file to 8-bit RGB, and say in words why a file cannot be used.

``to_rgb`` is the converter the configs hand to MONAI's ``PILReader``, so grayscale, palette,
CMYK and 16-bit files reach the network as the same 3-channel input as ordinary RGB JPEGs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes whose pixels have a defined colour meaning that Pillow converts to RGB losslessly enough.
_DIRECT_RGB_MODES = frozenset({"L", "1", "P", "CMYK", "YCbCr", "RGBX"})
# Modes with an alpha channel: transparent pixels are composited onto white (see _flatten_alpha).
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
# Grayscale integer modes holding 16-bit data (Pillow opens 16-bit PNGs as "I;16"; older versions as "I").
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


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
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit values to 8 bits by their top byte (65535 -> 255, 32768 -> 128), never by clipping."""
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise ValueError(
            f"unsupported image mode {image.mode!r}: values {values.min()}..{values.max()} exceed 16 bits"
        )
    gray = (values >> 8).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def decode_problem(path: str | os.PathLike) -> str | None:
    """Fully decode ``path`` the way training will; return a short reason it cannot be used, or None.

    Safe to call from worker threads: the decompression-bomb limit is checked here directly rather
    than by turning Pillow's warning into an error, because warning filters are process-wide.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "file is empty"
    except FileNotFoundError:
        return "file not found"
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
                return f"image too large: {pixels} pixels exceeds the decompression-bomb limit {Image.MAX_IMAGE_PIXELS}"
            image.load()
            to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"image too large: {error}"
    except UnidentifiedImageError:
        return "not an image file Pillow can identify"
    except ValueError as error:
        return str(error)
    except (OSError, SyntaxError) as error:  # Pillow raises SyntaxError for some corrupt headers
        return f"cannot decode: {error}"
    return None
