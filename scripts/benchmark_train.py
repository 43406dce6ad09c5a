"""Training throughput side by side, in one run on whatever device this machine has.

    python scripts/benchmark_train.py [--dataset_dir D] [--image_size 64] [--batch_size B]
        [--epochs E] [--e2e_batches K] [--data_epochs 3] [--workers W] [--skip_model]

Measures, with the bundle's own configs/train.json (the same network, loss, optimizer, trainer and
data paths that ``monai.bundle run`` uses):
  (a) model only: training steps on one batch already on the device;
  (b) the per-sample chain (train.json + ``configs/train_chain.json``) end to end: loader workers + training;
  (c) the cached fast path (train.json alone) end to end: cache + batched device augmentation
      + training;
  and the two data paths alone, with no model (what a CPU can show).
Data: ``--dataset_dir``, else $HAM10000_DIR, else a synthetic set generated in a temporary folder.
Prints a table and ends with one line
``RESULT fast_vs_chain=.. fast_vs_model=.. fast_img_per_s=.. data_only_fast_vs_chain=.. image_size=.. device=..``.
Throughputs are steady-state: the first epoch (worker start-up, cuDNN autotuning) is timed but left
out of img/s, and reported in the wall-time column.
"""

import math
import os
import resource
import tempfile
import time
from pathlib import Path

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from bundle import data, synthetic, training

REPO = Path(__file__).resolve().parents[1]
# Each data path is its configs: the fast path is train.json's default, the chain its overlay.
DATA_PATH_CONFIGS = {"fast": ["train.json"], "chain": ["train.json", "train_chain.json"]}


class RepeatedBatch:
    """A loader that yields the same device batch ``steps`` times: training with no data path."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class Bench:
    def __init__(
        self, datalist: Path, dataset_dir: str, image_size: int, batch_size: int | None, workers: int, work_dir: Path
    ) -> None:
        self.overrides = {
            "dataset_dir": dataset_dir,
            "datalist": str(datalist),
            "image_size": [image_size] * 2,
            "num_workers": workers,
            "cache_dir": str(work_dir / "cache"),
            "ckpt_dir": str(work_dir / "models"),
            "output_dir": str(work_dir / "eval"),
        }
        if batch_size:
            self.overrides["batch_size"] = batch_size
        self.rows: list[dict] = []

    def parser(self, data_path: str, **overrides) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config([str(REPO / "configs" / name) for name in DATA_PATH_CONFIGS[data_path]])
        parser.update({**self.overrides, "train#handlers": [], **overrides})
        training.seed_run(parser.get_parsed_content("seed"), parser.get_parsed_content("cudnn_benchmark"))
        return parser

    def row(self, name: str, images: int, seconds: float, wall: float, device: torch.device, **extra) -> float:
        rate = images / seconds if seconds > 0 else math.nan
        self.rows.append(
            {
                "name": name,
                "img_s": rate,
                "wall_s": wall,
                "gpu_gib": _peak_gib(device),
                "host_gib": _host_peak_gib(),
                **extra,
            }
        )
        print(f"  {name}: {rate:,.0f} img/s ({images} images in {seconds:.1f} s; wall {wall:.1f} s)", flush=True)
        return rate

    def loader(self, parser: ConfigParser, device: torch.device):
        """The config's training loader, with the time it took to build (decoding/caching included)."""
        _reset_peak(device)
        started = time.perf_counter()
        loader = parser.get_parsed_content("train#dataloader")
        return loader, time.perf_counter() - started

    def data_only(self, data_path: str, epochs: int, device: torch.device) -> float:
        parser = self.parser(data_path)
        wall_start = time.perf_counter()
        loader, build = self.loader(parser, device)
        images, timed = 0, 0.0
        for epoch in range(epochs):
            started = time.perf_counter()
            count = 0
            for batch in loader:
                count += batch["image"].to(device, non_blocking=True).shape[0]
            _sync(device)
            if epoch:  # the first epoch starts the workers: left out of img/s
                images, timed = images + count, timed + time.perf_counter() - started
        return self.row(
            f"data only, {data_path}", images, timed, time.perf_counter() - wall_start, device, build_s=build
        )

    def train(
        self, name: str, parser: ConfigParser, epoch_length: int | None, device: torch.device, loader=None
    ) -> float:
        """Time the config's trainer; ``parser`` sets max_epochs (the first epoch is left out of img/s)."""
        wall_start = time.perf_counter()
        if loader is None:
            loader, build = self.loader(parser, device)
        else:
            build = 0.0
        parser["train#dataloader"] = loader
        if epoch_length:
            parser["train#trainer#epoch_length"] = min(epoch_length, len(loader))
        trainer = parser.get_parsed_content("train#trainer")
        counts, times = [], []

        @trainer.on(Events.EPOCH_STARTED)
        def start(engine):
            counts.append(0)
            _sync(device)
            times.append(-time.perf_counter())

        @trainer.on(Events.ITERATION_COMPLETED)
        def count(engine):
            counts[-1] += engine.state.batch["image"].shape[0]

        @trainer.on(Events.EPOCH_COMPLETED)
        def stop(engine):
            _sync(device)
            times[-1] += time.perf_counter()

        trainer.run()
        return self.row(name, sum(counts[1:]), sum(times[1:]), time.perf_counter() - wall_start, device, build_s=build)

    def model_only(self, steps: int, device: torch.device) -> float:
        parser = self.parser("fast", max_epochs=2)
        loader, _ = self.loader(parser, device)
        batch = next(iter(loader))  # a real augmented batch, kept on the device
        return self.train("model only", parser, None, device, loader=RepeatedBatch(batch, steps))

    def cache_build(self, device: torch.device) -> None:
        """Cold (decode everything) and warm (reuse the file) construction of the training cache."""
        for label in ("cold", "warm"):
            started = time.perf_counter()
            cache = self.parser("fast").get_parsed_content("train#dataset")
            seconds = time.perf_counter() - started
            self.rows.append(
                {
                    "name": f"cache build, {label}",
                    "img_s": len(cache) / seconds,
                    "wall_s": seconds,
                    "gpu_gib": _peak_gib(device),
                    "host_gib": _host_peak_gib(),
                    "cache_gib": cache.nbytes / 2**30,
                    "storage": cache.storage,
                }
            )
            print(
                f"  cache build, {label}: {seconds:.1f} s for {len(cache)} images "
                f"({cache.nbytes / 2**20:.0f} MiB, storage {cache.storage})",
                flush=True,
            )


def _dataset(dataset_dir: str | None, n_images: int, work_dir: Path) -> tuple[str, Path, str]:
    source = dataset_dir or os.environ.get("HAM10000_DIR")
    if not source:
        source = str(synthetic.generate(work_dir / "synthetic", n_images=n_images))
        label = f"synthetic ({n_images} images, 200x150)"
    else:
        label = source
    records = data.read_ham10000(source)
    datalist = data.write_datalist(data.split_by_lesion(records), work_dir / "datalist.json", source)
    return source, datalist, label


def _table(rows: list[dict]) -> str:
    lines = [
        f"| {'measurement':<26} | {'img/s':>9} | {'setup s':>7} | {'wall s':>7} | {'GPU peak GiB':>12} "
        f"| {'host peak GiB':>13} |",
        f"|{'-' * 28}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 14}|{'-' * 15}|",
    ]
    for r in rows:
        gpu = "-" if r["gpu_gib"] is None else f"{r['gpu_gib']:.2f}"
        setup = f"{r['build_s']:.1f}" if "build_s" in r else "-"
        lines.append(
            f"| {r['name']:<26} | {r['img_s']:>9,.0f} | {setup:>7} | {r['wall_s']:>7.1f} | {gpu:>12} "
            f"| {r['host_gib']:>13.2f} |"
        )
    return "\n".join(lines)


def main(
    dataset_dir: str | None = None,
    n_images: int = 2000,
    image_size: int = 64,
    batch_size: int | None = None,
    epochs: int | None = None,
    e2e_batches: int | None = None,
    model_steps: int | None = None,
    data_epochs: int = 3,
    workers: int | None = None,
    skip_model: bool = False,
) -> None:
    """Run the measurements (see the module docstring) and print the table and the RESULT line.

    Defaults follow the device: on a GPU, ``epochs`` 3 over the whole training split and 30 model-only
    steps; on a CPU, where DenseNet121 trains at tens of images per second, 2 epochs of
    ``e2e_batches`` 6 and 6 model-only steps. ``workers`` (chain loader processes) defaults to all cores.
    """
    started = time.perf_counter()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    epochs = epochs or (3 if gpu else 2)
    e2e_batches = e2e_batches or (None if gpu else 6)
    model_steps = model_steps or (30 if gpu else 6)
    workers = workers or os.cpu_count() or 1
    device_name = torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(prefix="benchmark_train-") as tmp:
        work = Path(tmp)
        source, datalist, label = _dataset(dataset_dir, n_images, work)
        data.preflight(datalist, source, keys=["training"])  # every image decodes, before any timing
        bench = Bench(datalist, source, image_size, batch_size, workers, work)
        effective_batch = bench.parser("fast").get_parsed_content("batch_size")
        print(
            f"device {device_name}; data {label}; image_size {image_size}; batch_size {effective_batch}; "
            f"chain workers {workers}",
            flush=True,
        )
        bench.cache_build(device)
        data_fast = bench.data_only("fast", data_epochs, device)
        data_chain = bench.data_only("chain", data_epochs, device)
        model = fast = chain = math.nan
        if not skip_model:
            model = bench.model_only(model_steps, device)
            chain = bench.train("end to end, chain", bench.parser("chain", max_epochs=epochs), e2e_batches, device)
            fast = bench.train("end to end, fast", bench.parser("fast", max_epochs=epochs), e2e_batches, device)
        print()
        print(_table(bench.rows))
        print(f"whole run: {time.perf_counter() - started:.0f} s wall")
    print(
        f"RESULT fast_vs_chain={fast / chain:.2f} fast_vs_model={fast / model:.2f} fast_img_per_s={fast:.0f} "
        f"data_only_fast_vs_chain={data_fast / data_chain:.2f} image_size={image_size} "
        f"device={device_name.replace(' ', '_')}"
    )


if __name__ == "__main__":
    fire.Fire(main)
