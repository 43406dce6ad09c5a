"""Serving speed, side by side in one run: the in-process Predictor and TorchServe over HTTP.

    python scripts/benchmark_serving.py [--bundle_root .] [--requests 200] [--batch_size 8]
    python scripts/benchmark_serving.py --soak 600          # concurrency 32, good and bad images mixed
    python scripts/benchmark_serving.py --cost              # per image size: preprocessing ms, worker peak memory

Images: the first ``--n_images`` of ``$HAM10000_DIR`` when set, else a synthetic set made on the fly.
Measures, on whatever device the Predictor picks: batch-1 latency (p50/p99) of TorchServe and of the
in-process predictor, one request of each in turn (paired, so both see the same machine); TorchServe
throughput at concurrency 1, 8 and 32 with server-side batching; in-process batched throughput once
the server is stopped (so the two don't share the CPU); the worker's resident memory. Ends with one line
``RESULT serving_vs_inprocess=<best TorchServe img/s / in-process batched img/s> ts_p50_ms=..
inprocess_p50_ms=.. device=..``. ``--soak SECONDS`` instead holds concurrency 32 with one bad image
in five and reports unexpected answers, latency drift (p50 of the last minute / first minute) and
worker memory growth from the end of the first minute (after warm-up) to the end.

``--cost`` instead reports, per image size (the first image resized to 200x150, 600x450 and 4000x3000
JPEG, and 4000x3000 PNG): the in-process preprocessing time per image (``Predictor.preprocess``: header
checks, decoding and the config's chain, as a worker runs them; median of ``--cost_repeats``), the
TorchServe latency of one such request at a time, and the worker's peak resident memory while it
answers ``--cost_requests`` of them at concurrency 8 (server batches of up to ``--batch_size``): its
high-water mark (VmHWM) is reset before each size, so each row's peak is that size's own. The same
script measures the code before issue 9 (3930892), which wrote each image to a temporary file first.
"""

import io
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import numpy as np
import psutil
import requests

from bundle.predictor import Predictor
from bundle.synthetic import generate
from handler import MODEL_NAME, control
from handler.mar import write_mar

BAD_IMAGES = (b"", b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg")
COST_SIZES = (
    ("200x150 JPEG", (200, 150), "JPEG"),
    ("600x450 JPEG", (600, 450), "JPEG"),
    ("4000x3000 JPEG", (4000, 3000), "JPEG"),
    ("4000x3000 PNG", (4000, 3000), "PNG"),
)


def _images(n_images: int, scratch: Path) -> list[bytes]:
    real = os.environ.get("HAM10000_DIR")
    folder = Path(real) if real else generate(scratch / "synthetic", n_images=max(n_images, 42), seed=0)
    files = sorted(folder.rglob("*.jpg"))[:n_images]
    if not files:
        sys.exit(f"no .jpg images under {folder}")
    return [f.read_bytes() for f in files]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1000)


def _worker_rss_mb(server: dict, headers: dict) -> float:
    """Resident memory of the model's worker processes (the Python side, where the network lives)."""
    answer = requests.get(f"{server['management_url']}/models/{server['model']}", headers=headers, timeout=10).json()
    pids = [w["pid"] for entry in answer for w in entry["workers"]]
    total = 0
    for pid in pids:
        process = psutil.Process(pid)
        total += sum(p.memory_info().rss for p in (process, *process.children(recursive=True)))
    return total / 2**20


def _in_process_throughput(predictor: Predictor, images: list[bytes], requests_n: int, batch_size: int) -> float:
    predictor.predict(images[:batch_size])  # warm-up
    batches = max(requests_n // batch_size, 1)
    start = time.perf_counter()
    for i in range(batches):
        predictor.predict([images[(i * batch_size + j) % len(images)] for j in range(batch_size)])
    return batches * batch_size / (time.perf_counter() - start)


def _batch_one_latencies(client: "Client", predictor: Predictor, images: list[bytes], requests_n: int) -> dict:
    """Batch-1 latency of TorchServe and of the in-process predictor, one request of each in turn.

    Paired, so that both see the same machine: on a shared VM the in-process p50 alone moves by
    several milliseconds from one minute to the next, more than the overhead being measured.
    """
    predictor.predict(images[:1])  # warm-up
    served, local = [], []
    for i in range(requests_n):
        served.append(client.post(images[i % len(images)])[1])
        start = time.perf_counter()
        predictor.predict([images[i % len(images)]])
        local.append(time.perf_counter() - start)
    return {
        "ts_p50_ms": _percentile_ms(served, 50),
        "ts_p99_ms": _percentile_ms(served, 99),
        "p50_ms": _percentile_ms(local, 50),
        "p99_ms": _percentile_ms(local, 99),
    }


class Client:
    """Sends images to one TorchServe model and times each answer."""

    def __init__(self, server: dict, headers: dict) -> None:
        self.url = f"{server['inference_url']}/predictions/{server['model']}"
        self.headers = headers
        self.local = threading.local()

    def post(self, body: bytes) -> tuple[int, float]:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        start = time.perf_counter()
        status = session.post(self.url, data=body, headers=self.headers, timeout=120).status_code
        return status, time.perf_counter() - start

    def load(self, bodies: list[bytes], concurrency: int) -> tuple[list[tuple[int, float]], float]:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(self.post, bodies))
        return answers, time.perf_counter() - start


def _torchserve(client: Client, images: list[bytes], requests_n: int) -> dict:
    bodies = [images[i % len(images)] for i in range(requests_n)]
    client.load(bodies[:16], 8)  # warm-up
    result = {}
    for concurrency in (1, 8, 32):
        answers, wall = client.load(bodies, concurrency)
        if any(status != 200 for status, _ in answers):
            sys.exit(f"TorchServe refused good images at concurrency {concurrency}")
        result[f"img_per_s_c{concurrency}"] = len(bodies) / wall
    return result


def _sized_images(image: bytes) -> dict[str, bytes]:
    """``image`` resized (bicubic) to each of COST_SIZES and encoded as a camera would (JPEG quality 92)."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as source:
        rgb = source.convert("RGB")
    out = {}
    for name, size, image_format in COST_SIZES:
        buffer = io.BytesIO()
        rgb.resize(size, Image.Resampling.BICUBIC).save(
            buffer, image_format, **({"quality": 92} if image_format == "JPEG" else {})
        )
        out[name] = buffer.getvalue()
    return out


def _preprocess_function(predictor: Predictor):
    if hasattr(predictor, "preprocess"):
        return predictor.preprocess
    folder = Path(tempfile.mkdtemp(prefix="benchmark-preprocess-"))  # before issue 9: through a temporary file
    return lambda data: predictor._preprocess(data, folder / "image")


def _preprocess_ms(predictor: Predictor, data: bytes, repeats: int) -> float:
    preprocess = _preprocess_function(predictor)
    preprocess(data)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        preprocess(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _worker_pids(server: dict, headers: dict) -> list[int]:
    answer = requests.get(f"{server['management_url']}/models/{server['model']}", headers=headers, timeout=10).json()
    return [w["pid"] for entry in answer for w in entry["workers"]]


def _memory_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def _cost(client: Client, server: dict, management: dict, sized: dict[str, bytes], n_requests: int) -> dict:
    """Per size: TorchServe latency one at a time, and the worker's peak memory over a concurrent burst."""
    pids = _worker_pids(server, management)
    rows = {}
    for name, data in sized.items():
        client.post(data)  # warm-up
        latencies = [client.post(data) for _ in range(5)]
        if any(status != 200 for status, _ in latencies):
            sys.exit(f"TorchServe refused the {name} image: {latencies}")
        idle = sum(_memory_kb(pid, "VmRSS:") for pid in pids)
        for pid in pids:  # reset the high-water mark, so that this size's peak is its own
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        answers, _ = client.load([data] * n_requests, 8)
        if any(status != 200 for status, _ in answers):
            sys.exit(f"TorchServe refused the {name} image under load")
        rows[name] = {
            "served_p50_ms": statistics.median(t for _, t in latencies) * 1000,
            "worker_idle_mb": idle / 1024,
            "worker_peak_mb": sum(_memory_kb(pid, "VmHWM:") for pid in pids) / 1024,
        }
    return rows


def _soak(client: Client, images: list[bytes], seconds: float, rss) -> dict:
    """Concurrency 32 for ``seconds``; every fifth request is a bad image and must get a 4xx."""
    window = min(60.0, seconds / 3)
    rss_start, stop_at = rss(), time.monotonic() + seconds
    records, lock, counter = [], threading.Lock(), iter(range(10**9))
    rss_warm: list[float] = []
    warmed = threading.Timer(window, lambda: rss_warm.append(rss()))  # the baseline, once warmed up

    def loop():
        while time.monotonic() < stop_at:
            n = next(counter)
            bad = n % 5 == 4
            body = BAD_IMAGES[n % len(BAD_IMAGES)] if bad else images[n % len(images)]
            try:
                status, latency = client.post(body)
            except requests.RequestException:
                status, latency = -1, 0.0
            unexpected = not (400 <= status < 500) if bad else status != 200
            with lock:
                records.append((time.monotonic(), latency, unexpected, bad))

    threads = [threading.Thread(target=loop) for _ in range(32)]
    warmed.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first_t = records[0][0]
    early = [lat for t, lat, _, bad in records if t - first_t < window and not bad]
    late = [lat for t, lat, _, bad in records if t > records[-1][0] - window and not bad]
    rss_end = rss()
    return {
        "requests": len(records),
        "unexpected": sum(r[2] for r in records),
        "bad_sent": sum(r[3] for r in records),
        "p50_first_ms": statistics.median(early) * 1000,
        "p50_last_ms": statistics.median(late) * 1000,
        "worker_rss_start_mb": rss_start,
        "worker_rss_after_first_window_mb": rss_warm[0],
        "worker_rss_end_mb": rss_end,
        "worker_rss_growth_pct": 100 * (rss_end / rss_warm[0] - 1),
    }


def benchmark(
    bundle_root: str = ".",
    weights: str | None = None,
    n_images: int = 64,
    requests: int = 200,
    batch_size: int = 8,
    max_batch_delay_ms: int = 1,
    soak: float = 0,
    cost: bool = False,
    cost_repeats: int = 20,
    cost_requests: int = 24,
) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="benchmark-serving-"))
    images = _images(n_images, scratch)
    sized = _sized_images(images[0]) if cost else {}
    weights = weights or str(Path(bundle_root) / "models" / "model.pt")
    write_mar(
        bundle_root, weights, export_path=str(scratch), batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms
    )
    ports = dict(
        zip(
            ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port"),
            (_free_port() for _ in range(5)),
            strict=True,
        )
    )
    server = control.start_server(scratch / f"{MODEL_NAME}.mar", scratch / "run", **ports)
    try:
        client = Client(server, control.auth_headers(scratch / "run"))
        management = control.auth_headers(scratch / "run", api="management")
        rss = lambda: _worker_rss_mb(server, management)  # noqa: E731
        if cost:
            rows = _cost(client, server, management, sized, cost_requests)
            predictor = Predictor(bundle_root, weights)
            print(
                f"{'image':16}{'bytes':>10}{'preprocess ms':>15}{'served p50 ms':>15}{'worker idle MB':>16}"
                f"{'worker peak MB':>16}"
            )
            for name, data in sized.items():
                row = rows[name]
                row["preprocess_ms"] = _preprocess_ms(predictor, data, cost_repeats)
                print(
                    f"{name:16}{len(data):>10}{row['preprocess_ms']:>15.1f}{row['served_p50_ms']:>15.1f}"
                    f"{row['worker_idle_mb']:>16.0f}{row['worker_peak_mb']:>16.0f}"
                )
            print(
                f"server batch {batch_size}, {cost_requests} requests per size at concurrency 8 for the peak; "
                f"preprocessing: median of {cost_repeats}, in this process, while the server idles"
            )
            print(
                "RESULT "
                + " ".join(
                    f"{name.split()[0]}_{name.split()[1].lower()}_preprocess_ms={row['preprocess_ms']:.1f}"
                    f" {name.split()[0]}_{name.split()[1].lower()}_worker_peak_mb={row['worker_peak_mb']:.0f}"
                    for name, row in rows.items()
                )
            )
            return
        if soak:
            report = _soak(client, images, soak, rss)
            print(
                "\n".join(f"{k:>22}: {v:.1f}" if isinstance(v, float) else f"{k:>22}: {v}" for k, v in report.items())
            )
            print(
                f"RESULT soak_s={soak:.0f} unexpected={report['unexpected']} requests={report['requests']} "
                f"latency_drift={report['p50_last_ms'] / report['p50_first_ms']:.2f} "
                f"worker_rss_growth_pct={report['worker_rss_growth_pct']:.1f}"
            )
            return
        ts = _torchserve(client, images, requests)
        predictor = Predictor(bundle_root, weights)
        latency = _batch_one_latencies(client, predictor, images, requests)
        worker_mb = rss()
    finally:
        control.stop_server(scratch / "run")
    # measured after the server is gone, so the two don't share the CPU
    local_img_per_s = _in_process_throughput(predictor, images, requests, batch_size)
    best_ts = max(v for k, v in ts.items() if k.startswith("img_per_s"))
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'img/s':>10}")
    print(f"{'in-process batch 1':24}{latency['p50_ms']:>10.1f}{latency['p99_ms']:>10.1f}")
    print(f"{f'in-process batch {batch_size}':24}{'':>20}{local_img_per_s:>10.1f}")
    print(f"{'TorchServe c=1':24}{latency['ts_p50_ms']:>10.1f}{latency['ts_p99_ms']:>10.1f}{ts['img_per_s_c1']:>10.1f}")
    for c in (8, 32):
        print(f"{f'TorchServe c={c}':24}{'':>20}{ts[f'img_per_s_c{c}']:>10.1f}")
    print(
        f"worker resident memory: {worker_mb:.0f} MB; {len(images)} images, {requests} requests per row, "
        f"server batch {batch_size}, max delay {max_batch_delay_ms} ms"
    )
    print(
        f"RESULT serving_vs_inprocess={best_ts / local_img_per_s:.2f} ts_p50_ms={latency['ts_p50_ms']:.1f} "
        f"inprocess_p50_ms={latency['p50_ms']:.1f} device={predictor.device}"
    )


if __name__ == "__main__":
    fire.Fire(benchmark)
