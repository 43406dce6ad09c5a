"""What the serving tests share: a bundle root with untrained weights, image encodings, and malformed requests."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121
from PIL import Image

from bundle.labels import CLASS_NAMES
from bundle.sidecar import new_record, save_pair
from tests.bundle_runs import REPO

JPEG, PNG = "image/jpeg", "image/png"
# The fields of a served answer (bundle.predictor.Prediction.to_json), from every route.
SERVED_FIELDS = frozenset(
    {
        "class",
        "label",
        "probability",
        "probabilities",
        "decision_rule",
        "most_probable_class",
        "malignant_probability",
        "refer",
        "refer_threshold",
        "out_of_distribution",
        "ood_score",
        "ood_threshold",
        "ood_method",
    }
)
# The answer to an image the out-of-distribution guard flags (no diagnosis).
FLAGGED_FIELDS = frozenset(
    {"class", "label", "out_of_distribution", "ood_score", "ood_threshold", "ood_method", "reason"}
)


def assert_well_formed(answer: dict) -> None:
    """An answer is either a diagnosis (SERVED_FIELDS, probabilities summing to 1) or, for an image the
    out-of-distribution guard flags, the flag without one (FLAGGED_FIELDS): which one depends on the
    weights and the image, its shape never does."""
    if answer["out_of_distribution"]:
        assert set(answer) == FLAGGED_FIELDS and answer["class"] is None and answer["reason"]
    else:
        assert set(answer) == SERVED_FIELDS and answer["class"] in answer["probabilities"]
        assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)


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


def store_triage_calibration(root: Path, images: list[bytes], weights: str = "model.pt") -> dict:
    """Store in the sidecar of ``root``'s ``models/<weights>`` a calibration under which every served field
    shows something: a decision rule that picks the least probable class of the first image (so an
    answer's class differs from its most probable one), and a refer threshold halfway between the two
    middle malignant probabilities of ``images`` (so some are referred and some not, and none sits on
    the threshold). Returns the calibration stored."""
    from bundle.calibration import malignant_probability
    from bundle.predictor import Predictor

    weights_path = root / "models" / weights
    plain = Predictor(root, weights=weights_path, device="cpu").predict(images)
    probabilities = np.array([[result.probabilities[c] for c in CLASS_NAMES] for result in plain])
    malignant = np.sort(malignant_probability(probabilities))
    middle = len(malignant) // 2
    assert malignant[middle - 1] < malignant[middle], "the images need distinct malignant probabilities"
    bias = [0.0] * len(CLASS_NAMES)
    bias[int(probabilities[0].argmin())] = 100.0
    calibration = {
        "temperature": 1.0,
        "class_bias": bias,
        "refer_threshold": float(malignant[middle - 1] + malignant[middle]) / 2,
    }
    sidecar = weights_path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "calibration": calibration}))
    return calibration


def store_guard(root: Path, dataset_dir: Path, weights: str = "model.pt") -> dict:
    """Fit the out-of-distribution guard of ``root``'s ``models/<weights>`` on the images of ``dataset_dir``
    (a HAM10000-layout folder, standing in for the validation split) with their labels, through the
    Predictor's own forward pass, and store it as training does (``bundle.ood.store``). Returns the
    sidecar's ``ood`` block."""
    from bundle import ood
    from bundle.data import read_ham10000
    from bundle.predictor import Predictor
    from bundle.sidecar import FINGERPRINT, read_sidecar, write_sidecar

    weights_path = root / "models" / weights
    predictor = Predictor(root, weights=weights_path, device="cpu")
    records = read_ham10000(dataset_dir)
    batch = torch.stack([predictor.preprocess((dataset_dir / record["image"]).read_bytes()) for record in records])
    logits, features = predictor.forward(batch)
    fitted = ood.fit(logits, features, torch.tensor([record["label"] for record in records]))
    record = read_sidecar(weights_path)
    record["ood"] = ood.store(weights_path, fitted, record[FINGERPRINT])
    write_sidecar(weights_path, record)
    ood.remove_stale(weights_path)
    return record["ood"]


def out_of_distribution_image(size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG nothing like a lesion: a uniform saturated green frame (scored far above any fitted threshold
    even by an untrained network's features)."""
    return encode(Image.new("RGB", size, (0, 200, 0)), "JPEG")


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
    cases |= {
        f"text_{i}": text.encode()
        for i, text in enumerate(
            ["hello", "<html><body>not an image</body></html>", "%PDF-1.4\n", "GIF", "\x89PNG", "\xff\xd8\xff"]
        )
    }
    cases |= {
        f"jpeg_cut_at_{fraction:.2f}": good_jpeg[: int(len(good_jpeg) * fraction)]
        for fraction in np.linspace(0.05, 0.9, 18)
    }
    cases |= {
        f"png_cut_at_{fraction:.2f}": good_png[: int(len(good_png) * fraction)]
        for fraction in np.linspace(0.05, 0.9, 12)
    }
    cases |= {
        f"png_declares_{w}x{h}": png_header(w, h)
        for w, h in ((100_000, 100_000), (20_000, 20_000), (6_000, 5_000), (50_000, 600), (1, 30_000_000))
    }
    cases["png_bomb_6000x5000"] = zero_filled_png(6_000, 5_000)
    cases |= {f"format_{fmt.lower()}": encode(small, fmt) for fmt in ("GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM")}
    return cases


def lying_png_headers() -> dict[str, bytes]:
    """69-byte PNGs whose headers claim sizes their bytes cannot hold, degenerate shapes among them."""
    sizes = [
        (1, 25_000_000),
        (25_000_000, 1),
        (2, 12_500_000),
        (5_000, 5_000),
        (4_000, 3_000),
        (3_000, 4_000),
        (25_000, 1_000),
        (1_000, 25_000),
        (10_000, 2_500),
        (2_048, 2_048),
        (1_500, 1_000),
        (16, 1_000_000),
        (1_000_000, 16),
        (15, 15),
        (16, 16),
        (160, 16),
        (161, 16),
        (65_535, 65_535),
        (2**31 - 1, 1),
        (1, 2**31 - 1),
    ]
    return {f"png_claims_{w}x{h}": png_header(w, h) for w, h in sizes}


def fuzzed_image_bytes(
    good_jpeg: bytes, good_png: bytes, seed: int = 0, n_cuts: int = 120, n_flips: int = 200
) -> dict[str, bytes]:
    """Truncations and bit flips of a real JPEG and PNG: each may still decode (2xx) or not (4xx), never 5xx."""
    rng = np.random.default_rng(seed)
    cases = {}
    for kind, data in (("jpeg", good_jpeg), ("png", good_png)):
        for cut in sorted(set(rng.integers(1, len(data), n_cuts).tolist())):
            cases[f"{kind}_cut_at_byte_{cut}"] = data[:cut]
        for i in range(n_flips):
            flipped = bytearray(data)
            # half the flips land in the first 600 bytes, where headers, tables and chunk lengths live
            limit = min(600, len(data)) if i % 2 else len(data)
            for position in rng.integers(0, limit, rng.integers(1, 9)):
                flipped[position] ^= 1 << int(rng.integers(0, 8))
            cases[f"{kind}_bit_flips_{i}"] = bytes(flipped)
    return cases


# Content types clients send; the frontend and the handler must answer each with a 2xx or a 4xx. Not
# application/x-www-form-urlencoded: TorchServe's frontend answers 500 itself when such a body is not
# form-encoded, before any handler sees it.
CONTENT_TYPES = [
    "image/jpeg",
    "image/png",
    "IMAGE/JPEG",
    "image/png;charset=x",
    "image/jpeg; charset=binary",
    "image/jpg",
    "image/pjpeg",
    "image/gif",
    "image/webp",
    "image/bmp",
    "image/tiff",
    "image/svg+xml",
    "image/heic",
    "image/avif",
    "image/x-icon",
    "application/octet-stream",
    "application/x-image",
    "application/json",
    "application/json; charset=utf-8",
    "application/ld+json",
    "application/xml",
    "application/pdf",
    "application/zip",
    "application/gzip",
    "application/x-npy",
    "application/x-protobuf",
    "application/javascript",
    "text/plain",
    "text/html",
    "text/csv",
    "text/xml",
    "text/json",
    "text/plain; charset=latin-1",
    "audio/wav",
    "audio/mpeg",
    "video/mp4",
    "font/woff",
    "multipart/mixed",
    "multipart/related",
    "message/rfc822",
    "x-custom/thing",
    "*/*",
    "invalid",
    ";;;",
]


def nested_json(depth: int, under_image: bool, kind: str = "list") -> bytes:
    opening, closing = ("[", "]") if kind == "list" else ('{"a": ', "}")
    inner = opening * depth + ("1" if kind == "dict" else "") + closing * depth
    return (f'{{"image": {inner}}}' if under_image else inner).encode()


def hostile_json_requests(good_jpeg: bytes) -> dict[str, dict]:
    """Nested, huge and oversized-base64 JSON bodies, each under the frontend's 16 MiB limit: 4xx each."""
    json_type = {"Content-Type": "application/json"}
    cases = {}
    for depth in (1_000, 10_000, 100_000, 1_000_000):
        for under_image in (False, True):
            for kind in ("list", "dict"):
                body = nested_json(depth, under_image, kind)
                if len(body) < 16_000_000:
                    cases[f"json_nested_{kind}_{depth}{'_under_image' if under_image else ''}"] = {
                        "data": body,
                        "headers": json_type,
                    }
    cases["json_nested_unterminated"] = {"data": b"[" * 1_000_000, "headers": json_type}
    cases["json_huge_base64_of_zeros"] = {"data": b'{"image": "' + b"A" * 15_000_000 + b'"}', "headers": json_type}
    cases["json_huge_base64_of_noise"] = {
        "json": {"image": base64.b64encode(np.random.default_rng(1).bytes(11_000_000)).decode()}
    }
    cases["json_base64_of_png_bomb"] = {"json": {"image": base64.b64encode(zero_filled_png(6_000, 5_000)).decode()}}
    cases["json_huge_padding_field"] = {"json": {"padding": "x" * 12_000_000, "image": "!!"}}
    cases["json_huge_array"] = {"data": ("[" + "1," * 5_000_000 + "1]").encode(), "headers": json_type}
    cases["json_many_keys"] = {"data": json.dumps({f"k{i}": i for i in range(500_000)}).encode(), "headers": json_type}
    cases["json_image_as_huge_string_of_non_base64"] = {"json": {"image": "é" * 2_000_000}}
    cases["json_base64_wrapped_every_byte"] = {"json": {"image": "\n".join(base64.b64encode(b"x" * 30_000).decode())}}
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
    bad_json = [
        "{",
        "}",
        "[",
        "nul",
        '{"image": ',
        "{'image': 'abc'}",
        '{"image": "abc"',
        "\ufeff{",
        "{}}",
        '{"image": "a" "b"}',
        "NaN NaN",
        '{"image": undefined}',
    ]
    cases |= {
        f"bad_json_{i}": {"data": text.encode(), "headers": {"Content-Type": "application/json"}}
        for i, text in enumerate(bad_json)
    }
    cases["bad_json_not_utf8"] = {"data": b'{"image": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}
    wrong_shape = [
        [],
        {},
        5,
        "text",
        None,
        {"img": "abc"},
        {"image": 5},
        {"image": None},
        {"image": ["a"]},
        [{"image": "abc"}],
    ]
    cases |= {
        f"json_shape_{i}": {"data": json.dumps(value).encode(), "headers": {"Content-Type": "application/json"}}
        for i, value in enumerate(wrong_shape)
    }
    bad_base64 = ["!!!!", "abc", "a", "====", "ab=c", "é", "data:image/jpeg;base64,/9j/", "ab\x00c", "%%%%", "a==="]
    cases |= {f"bad_base64_{i}": {"json": {"image": text}} for i, text in enumerate(bad_base64)}
    # Not application/x-www-form-urlencoded: TorchServe's frontend answers 500 itself when such a body is
    # not form-encoded, before any handler sees it (a well-formed form is below).
    wrong_types = [
        "text/plain",
        "application/xml",
        "text/html",
        "application/pdf",
        "video/mp4",
        "text/csv",
        "audio/wav",
        "application/zip",
    ]
    cases |= {f"content_type_{t}": {"data": good_jpeg, "headers": {"Content-Type": t}} for t in wrong_types}
    cases["multipart_without_image_field"] = {"files": {"other": ("x.jpg", good_jpeg, JPEG)}}
    cases["multipart_text_field"] = {"data": {"data": "not a file"}, "files": {"unrelated": ("x", b"", "text/plain")}}
    cases["form_urlencoded_field"] = {"data": {"image": "not an image"}}
    cases |= {
        f"raw_png_type/{name}": {"data": data, "headers": {"Content-Type": PNG}}
        for name, data in lying_png_headers().items()
    }
    cases |= {
        f"json_base64/{name}": {"json": {"image": base64.b64encode(data).decode()}}
        for name, data in lying_png_headers().items()
    }
    cases |= hostile_json_requests(good_jpeg)
    garbage = b"\x00garbage\xff" * 10
    cases |= {
        f"garbage_as/{content_type}": {"data": garbage, "headers": {"Content-Type": content_type}}
        for content_type in CONTENT_TYPES
    }
    return cases


def fuzzed_requests(good_jpeg: bytes, good_png: bytes) -> dict[str, dict]:
    """Requests that may be answered 2xx or 4xx, never 5xx: fuzzed images, and a good image under every content type."""
    cases = {
        f"raw/{name}": {"data": data, "headers": {"Content-Type": PNG if name.startswith("png") else JPEG}}
        for name, data in fuzzed_image_bytes(good_jpeg, good_png).items()
    }
    cases |= {
        f"good_jpeg_as/{content_type}": {"data": good_jpeg, "headers": {"Content-Type": content_type}}
        for content_type in CONTENT_TYPES
    }
    # TorchServe puts the request's headers in the dict of its fields: a header named like one must not break it
    cases |= {
        f"good_jpeg_with_a_header_named/{field}": {"data": good_jpeg, "headers": {"Content-Type": JPEG, field: "x"}}
        for field in ("body", "data", "image", "file")
    }
    return cases


def sagemaker_model_dir(bundle_root: Path, work: Path, *options: str) -> Path:
    """``model.tar.gz`` built by scripts/package_sagemaker.py from ``bundle_root`` (``options``: more of its
    flags), extracted under ``work`` as the container extracts it to /opt/ml/model."""
    archive = work / "model.tar.gz"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/package_sagemaker.py",
            "--bundle_root",
            str(bundle_root),
            "--output",
            str(archive),
            *options,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    extracted = work / "opt_ml_model"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    return extracted
