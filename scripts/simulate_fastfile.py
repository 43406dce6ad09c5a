"""What the training job's reads of its data channel cost under SageMaker's FastFile input mode, simulated
on this machine, against File mode.

    python scripts/simulate_fastfile.py --dataset_dir ../shared/data/ham10000-200x150 \
        [--image_size "[64,64]" --latency_ms "[0,10,25,50,100]" --mb_per_s 100 --output fastfile.json]

In File mode SageMaker copies the whole channel to the instance's volume before the entry script starts;
in FastFile mode the channel is mounted at once and each file is fetched from S3 when first read (a
request's latency plus its bytes at the instance's S3 throughput), later reads coming from the local
cache. Before the first training step the job reads every image: ``preflight`` decodes each image of the
training and validation splits (a thread pool), then ``ImageCache`` decodes each again into the uint8
cache (DataLoader workers); evaluation then does both for the test split. This script runs exactly those
calls of the bundle (``bundle.data``, ``bundle.cache``) on a dataset folder, with every first ``open`` of
one of its files delayed by ``latency_ms + size / mb_per_s``, in every thread and worker process. Latency
0 is File mode once the copy is done; the copy itself is not simulated and is reported as bytes over
``mb_per_s``. It prints one row per latency and writes them to ``--output`` as JSON.
"""

import builtins
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
SPLITS = (("training", "validation"), ("testing",))  # what training reads, then what evaluation reads


@contextlib.contextmanager
def lazy_reads(dataset_dir: Path, latency_s: float, bytes_per_s: float, scratch: Path):
    """Every first ``open`` of a file under ``dataset_dir`` waits as a FastFile fetch from S3 would.

    "First" holds across threads and forked worker processes: a marker file created with O_EXCL says a
    file was fetched; every open appends a byte to ``opens``, so reads can be counted afterwards.
    """
    root = str(dataset_dir.resolve()) + os.sep
    markers, opens = scratch / "fetched", scratch / "opens"
    markers.mkdir()
    original = builtins.open

    def fetching_open(file, *args, **kwargs):
        path = os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else ""
        if path.startswith(root):
            descriptor = os.open(opens, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.write(descriptor, b".")
            os.close(descriptor)
            marker = markers / hashlib.sha1(path.encode()).hexdigest()
            try:
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                time.sleep(latency_s + os.path.getsize(path) / bytes_per_s)
            except FileExistsError:
                pass
        return original(file, *args, **kwargs)

    builtins.open = fetching_open
    try:
        yield lambda: (len(list(markers.iterdir())), opens.stat().st_size if opens.exists() else 0)
    finally:
        builtins.open = original


def preprocessing(image_size: list[int]):
    """The bundle's own preprocessing (configs/inference.json) at ``image_size``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    parser["image_size"] = list(image_size)
    return parser.get_parsed_content("preprocessing")


def job_reads(dataset_dir: Path, datalist: Path, chain, work: Path) -> dict:
    """Seconds spent in the reads a job makes before training (preflight, cache build) and in evaluation."""
    from bundle import data
    from bundle.cache import ImageCache

    seconds = {}
    for keys in SPLITS:
        started = time.perf_counter()
        data.preflight(datalist, dataset_dir, keys=list(keys))
        seconds[f"preflight {'+'.join(keys)}"] = time.perf_counter() - started
        for key in keys:
            started = time.perf_counter()
            items = data.load_datalist(datalist, key, dataset_dir)
            ImageCache(items, chain, str(work / "cache"), device="cpu", storage="memmap", progress=False, name=key)
            seconds[f"cache {key}"] = time.perf_counter() - started
    return seconds


def main(
    dataset_dir: str,
    image_size: tuple = (64, 64),
    latency_ms: tuple = (0, 10, 25, 50, 100),
    mb_per_s: float = 100.0,
    output: str = None,
) -> None:
    from bundle import data

    dataset_dir = Path(dataset_dir)
    chain = preprocessing(list(image_size))
    with tempfile.TemporaryDirectory(prefix="fastfile-") as scratch:
        datalist = data.write_datalist(
            data.split_by_lesion(data.read_ham10000(dataset_dir), seed=0), Path(scratch) / "datalist.json", dataset_dir
        )
        images = [
            Path(item["image"]) for key in ("training", "validation", "testing") for item in _items(datalist)[key]
        ]
        total_bytes = sum((dataset_dir / image).stat().st_size for image in images)
        data.preflight(datalist, dataset_dir, keys=["training", "validation", "testing"])  # warm the page cache
        rows = []
        for latency in latency_ms:
            work = Path(tempfile.mkdtemp(dir=scratch))
            with lazy_reads(dataset_dir, latency / 1000, mb_per_s * 1e6, work) as counts:
                seconds = job_reads(dataset_dir, datalist, chain, work)
                fetched, opened = counts()
            row = {"latency_ms": latency, "seconds": seconds, "total_s": sum(seconds.values())}
            row |= {"files_fetched": fetched, "opens": opened}
            rows.append(row)
            print(
                f"latency {latency:>4} ms: {row['total_s']:7.1f} s in all ("
                + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
                + f"); {fetched} files fetched, {opened} opens",
                flush=True,
            )
    download_s = total_bytes / (mb_per_s * 1e6)
    print(
        f"{len(images)} images, {total_bytes / 1e6:.1f} MB: File mode first copies them "
        f"({download_s:.1f} s at {mb_per_s:g} MB/s, plus its per-object latency), then reads them as at latency 0"
    )
    result = {
        "dataset_dir": str(dataset_dir),
        "images": len(images),
        "bytes": total_bytes,
        "image_size": list(image_size),
        "mb_per_s": mb_per_s,
        "cpu_count": os.cpu_count(),
        "preflight_threads": min(32, (os.cpu_count() or 1) + 4),  # ThreadPoolExecutor's default
        "file_mode_copy_s": download_s,
        "rows": rows,
    }
    if output:
        Path(output).write_text(json.dumps(result, indent=1))


def _items(datalist: Path) -> dict:
    return json.loads(Path(datalist).read_text())


if __name__ == "__main__":
    sys.exit(fire.Fire(main))
