"""What the serving tests share: a bundle root with untrained weights, image encodings, and malformed requests."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import DenseNet121
from PIL import Image

from bundle.labels import CLASS_NAMES
from bundle.sidecar import new_record, save_pair
from tests.bundle_runs import REPO

JPEG, PNG = "image/jpeg", "image/png"


def bundle_with_random_weights(root: Path, seed: int = 0, trained_image_size: list[int] | None = None) -> Path:
    """The repository's configs plus a randomly initialised DenseNet121 as models/model.pt: parity
    between serving and the bundle run does not need a trained network. Beside it the sidecar
    (models/model.json) training writes, saying the weights were trained at ``trained_image_size``
    (default: the size configs/inference.json declares)."""
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "models").mkdir()
    torch.manual_seed(seed)
    network = DenseNet121(spatial_dims=2, in_channels=3, out_channels=len(CLASS_NAMES))
    size = trained_image_size or json.loads((REPO / "configs" / "inference.json").read_text())["image_size"]
    save_pair(root / "models" / "model.pt", network.state_dict(), new_record(network.state_dict(), size))
    return root


def encode(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def decoded_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def mode_variants(rgb: Image.Image) -> dict[str, bytes]:
    """The same picture as the non-RGB files clients send; every one must be converted and classified."""
    gray = np.asarray(rgb.convert("L"))
    alpha = np.tile(np.linspace(0, 255, rgb.width, dtype=np.uint8), (rgb.height, 1))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "grayscale.png": encode(rgb.convert("L"), "PNG"),
        "grayscale.jpg": encode(rgb.convert("L"), "JPEG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "sixteen_bit.png": encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
    }


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zero_filled_png(width: int, height: int) -> bytes:
    """A real, fully decodable PNG of ``width`` x ``height`` black pixels: tiny on the wire, huge decoded."""
    return encode(Image.new("L", (width, height)), "PNG", compress_level=1)


def bad_image_bytes(good_jpeg: bytes, good_png: bytes, seed: int = 0) -> dict[str, bytes]:
    """Bytes that are not a usable JPEG or PNG, each named by what is wrong with it."""
    rng = np.random.default_rng(seed)
    small = Image.new("RGB", (8, 8), (120, 60, 30))
    cases = {"empty": b""}
    cases |= {f"random_{n}_bytes": rng.bytes(n) for n in (1, 2, 7, 64, 500, 4096)}
    cases |= {f"text_{i}": text.encode() for i, text in enumerate(
        ["hello", "<html><body>not an image</body></html>", "%PDF-1.4\n", "GIF", "\x89PNG", "\xff\xd8\xff"])}
    cases |= {f"jpeg_cut_at_{fraction:.2f}": good_jpeg[: int(len(good_jpeg) * fraction)]
              for fraction in np.linspace(0.05, 0.9, 18)}
    cases |= {f"png_cut_at_{fraction:.2f}": good_png[: int(len(good_png) * fraction)]
              for fraction in np.linspace(0.05, 0.9, 12)}
    cases |= {f"png_declares_{w}x{h}": png_header(w, h)
              for w, h in ((100_000, 100_000), (20_000, 20_000), (6_000, 5_000), (50_000, 600), (1, 30_000_000))}
    cases["png_bomb_6000x5000"] = zero_filled_png(6_000, 5_000)
    cases |= {f"format_{fmt.lower()}": encode(small, fmt) for fmt in ("GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM")}
    return cases


def malformed_requests(good_jpeg: bytes, good_png: bytes) -> dict[str, dict]:
    """At least 200 requests (``requests.post`` keyword arguments) that must each get a 4xx JSON error."""
    bad = bad_image_bytes(good_jpeg, good_png)
    cases = {}
    for name, data in bad.items():
        cases[f"raw_jpeg_type/{name}"] = {"data": data, "headers": {"Content-Type": JPEG}}
        cases[f"raw_png_type/{name}"] = {"data": data, "headers": {"Content-Type": PNG}}
        cases[f"multipart/{name}"] = {"files": {"data": ("upload", data, "application/octet-stream")}}
        cases[f"json_base64/{name}"] = {"json": {"image": base64.b64encode(data).decode()}}
    bad_json = ["{", "}", "[", "nul", '{"image": ', "{'image': 'abc'}", '{"image": "abc"', "\ufeff{", "{}}",
                '{"image": "a" "b"}', "NaN NaN", '{"image": undefined}']
    cases |= {f"bad_json_{i}": {"data": text.encode(), "headers": {"Content-Type": "application/json"}}
              for i, text in enumerate(bad_json)}
    cases["bad_json_not_utf8"] = {"data": b'{"image": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}
    wrong_shape = [[], {}, 5, "text", None, {"img": "abc"}, {"image": 5}, {"image": None}, {"image": ["a"]},
                   [{"image": "abc"}]]
    cases |= {f"json_shape_{i}": {"data": json.dumps(value).encode(), "headers": {"Content-Type": "application/json"}}
              for i, value in enumerate(wrong_shape)}
    bad_base64 = ["!!!!", "abc", "a", "====", "ab=c", "é", "data:image/jpeg;base64,/9j/", "ab\x00c", "%%%%", "a==="]
    cases |= {f"bad_base64_{i}": {"json": {"image": text}} for i, text in enumerate(bad_base64)}
    # Not application/x-www-form-urlencoded: TorchServe's frontend answers 500 itself when such a body is
    # not form-encoded, before any handler sees it (a well-formed form is below).
    wrong_types = ["text/plain", "application/xml", "text/html", "image/gif", "application/pdf", "video/mp4",
                   "image/svg+xml", "text/csv", "audio/wav", "application/zip"]
    cases |= {f"content_type_{t}": {"data": good_jpeg, "headers": {"Content-Type": t}} for t in wrong_types}
    cases["multipart_without_image_field"] = {"files": {"other": ("x.jpg", good_jpeg, JPEG)}}
    cases["multipart_text_field"] = {"data": {"data": "not a file"}, "files": {"unrelated": ("x", b"", "text/plain")}}
    cases["form_urlencoded_field"] = {"data": {"image": "not an image"}}
    return cases
