"""A request's cost is bounded, whatever its header claims (issue 9, section 1).

Every image the server accepts is preprocessed (``Predictor.preprocess``: the header checks and the
config's own chain, as a TorchServe worker runs them) in at most 0.5 s of CPU and 300 MB of extra
memory, the worst cases the limits allow included; degenerate and lying headers are refused before any
pixel is decoded; and no temporary file is written, so a full disk fails nothing.
"""

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.imageio import MAX_ASPECT_RATIO, MIN_SIDE
from bundle.predictor import MAX_PIXELS, MAX_PNG_PIXELS, Prediction, Rejection, RejectionKind
from tests.bundle_runs import REPO
from tests.serving import png_header, zero_filled_png

MAX_CPU_S = 0.5
MAX_EXTRA_MB = 300
MAX_REQUEST_SIZE = 16 * 1024 * 1024  # handler/config.properties: the frontend refuses larger bodies
CHEAP_CPU_S = 0.05

# Run in a fresh interpreter, as a worker would: for each image, reset the kernel's high-water mark of
# resident memory (/proc/self/clear_refs), preprocess, and read the mark back. Freed memory is handed
# back to the system between images (a fixed mmap threshold and malloc_trim), so one image's leftovers
# don't hide the next one's needs. CPU time is the least of three runs, which a busy machine inflates least.
PROBE = """
import ctypes, json, sys, time
from pathlib import Path
from bundle.predictor import Predictor
status = lambda key: next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                          if line.startswith(key))
predictor = Predictor(sys.argv[1], device="cpu")
costs = {}
for path in map(Path, sys.argv[2:]):
    data = path.read_bytes()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    start = time.process_time()
    shape = tuple(predictor.preprocess(data).shape)
    cpu = [time.process_time() - start]
    extra_mb = status("VmHWM:") - before
    for _ in range(2):
        start = time.process_time()
        predictor.preprocess(data)
        cpu.append(time.process_time() - start)
    costs[path.name] = {"cpu_s": min(cpu), "extra_mb": extra_mb, "shape": shape}
print(json.dumps(costs))
"""


def _photo(width: int, height: int, seed: int = 0, noise: float = 3) -> Image.Image:
    """A lesion-photo-like picture: smooth colour regions with sensor noise (noise keeps JPEGs large)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    return Image.fromarray(np.clip(smooth + rng.normal(0, noise, smooth.shape), 0, 255).astype(np.uint8))


def _encode(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


WORST_CASES = [
    "phone_4000x3000.jpg",
    "25mp_progressive_444.jpg",
    "25mp_cmyk.jpg",
    "12mp_rgb.png",
    "12mp_rgba.png",
    "12mp_16bit.png",
    "12mp_palette_transparent.png",
]


def _worst_cases() -> dict[str, bytes]:
    """The costliest images the limits let in: 25 MP JPEGs (progressive 4:4:4 makes libjpeg keep every
    coefficient), CMYK, the phone photo, and PNGs at the PNG limit in every costly mode."""
    side = int(MAX_PIXELS**0.5)
    big = _photo(side, side)
    png = _photo(4_000, MAX_PNG_PIXELS // 4_000, seed=1, noise=0)
    png_smooth = Image.fromarray(np.asarray(png) // 2 * 2)  # under the request limit as RGBA too
    rgba = png_smooth.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, png.width, dtype=np.uint8), (png.height, 1))))
    cases = {
        "phone_4000x3000.jpg": _encode(big.resize((4_000, 3_000)), "JPEG", quality=92),
        "25mp_progressive_444.jpg": _encode(big, "JPEG", quality=90, progressive=True, subsampling=0),
        "25mp_cmyk.jpg": _encode(big.convert("CMYK"), "JPEG", quality=80),
        "12mp_rgb.png": _encode(png_smooth, "PNG"),
        "12mp_rgba.png": _encode(rgba, "PNG"),
        "12mp_16bit.png": _encode(Image.fromarray(np.asarray(png.convert("L")).astype(np.uint16) * 257), "PNG"),
        "12mp_palette_transparent.png": _encode(png_smooth.convert("P"), "PNG", transparency=0),
    }
    assert list(cases) == WORST_CASES
    return cases


@pytest.fixture(scope="module")
def worst_cases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("worst_cases")
    paths = {"warm_up.jpg": folder / "warm_up.jpg"}
    _photo(200, 150).save(paths["warm_up.jpg"])
    for name, data in _worst_cases().items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def costs(worst_cases, bundle_root) -> dict[str, dict]:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(bundle_root), *map(str, worst_cases.values())],
        cwd=REPO,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    return json.loads(probe.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", WORST_CASES)
def test_an_accepted_worst_case_image_costs_at_most_half_a_second_and_300_mb(name, worst_cases, predictor, costs):
    data = worst_cases[name].read_bytes()
    assert len(data) <= MAX_REQUEST_SIZE, "the server would refuse it anyway: not a worst case"
    [result] = predictor.predict([data])
    assert isinstance(result, Prediction), result
    cost = costs[name]
    assert cost["shape"] == [3, 64, 64]
    assert cost["cpu_s"] <= MAX_CPU_S, cost
    assert cost["extra_mb"] <= MAX_EXTRA_MB, cost


REFUSED_FROM_THE_HEADER = {
    # 69 bytes each: a header, an IDAT of 64 zero bytes, an IEND
    "1x25000000_in_69_bytes": (png_header(1, 25_000_000), RejectionKind.BAD_SHAPE, f"at least {MIN_SIDE} pixels"),
    "25000000x1_in_69_bytes": (png_header(25_000_000, 1), RejectionKind.BAD_SHAPE, f"at least {MIN_SIDE} pixels"),
    "3000x100_in_69_bytes": (png_header(3_000, 100), RejectionKind.BAD_SHAPE, f"limit of {MAX_ASPECT_RATIO}:1"),
    "3000x3000_in_69_bytes": (png_header(3_000, 3_000), RejectionKind.UNDECODABLE, "corrupt PNG: its header claims"),
    "real_png_5000x5000": (zero_filled_png(5_000, 5_000), RejectionKind.TOO_LARGE, f"PNG limit of {MAX_PNG_PIXELS}"),
    "real_png_12000x400": (zero_filled_png(12_000, 400), RejectionKind.BAD_SHAPE, f"limit of {MAX_ASPECT_RATIO}:1"),
    "real_jpeg_6000x5000": (
        _encode(Image.new("RGB", (6_000, 5_000)), "JPEG"),
        RejectionKind.TOO_LARGE,
        f"limit of {MAX_PIXELS}",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED_FROM_THE_HEADER))
def test_degenerate_and_lying_headers_are_refused_before_decoding_naming_the_limit(name, predictor):
    data, kind, limit = REFUSED_FROM_THE_HEADER[name]
    started = time.process_time()
    [result] = predictor.predict([data])
    assert time.process_time() - started < CHEAP_CPU_S
    assert isinstance(result, Rejection) and result.kind == kind, result
    assert limit in result.error, result.error


def test_no_temporary_file_is_written_so_a_full_disk_fails_nothing(predictor, worst_cases, monkeypatch):
    """Every temporary file would land in a folder that does not exist (as good as a full disk)."""
    monkeypatch.setattr(tempfile, "tempdir", str(Path(tempfile.gettempdir()) / "no-such-folder" / "full"))
    good = worst_cases["warm_up.jpg"].read_bytes()
    results = predictor.predict([good, b"not an image", good[: len(good) // 2], good])
    assert [type(result) for result in results] == [Prediction, Rejection, Rejection, Prediction], results
