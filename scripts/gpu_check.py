"""Prove the bundle's GPU path on a CUDA machine, with the commands users run.

    python scripts/gpu_check.py --dataset_dir D --work_dir W [--epochs 30] [--benchmark_sizes "[64,224]"]
        [--warm_rerun true] [--ddp true] [--benchmark_epochs 3]

1. prepares a lesion-level datalist, 2. trains with ``monai.bundle run`` (the config picks cuda,
bf16 AMP and the fast data path by itself), timed from the command's start with a cold cache, then
(``warm_rerun``) again with the cache from the first run, 3. evaluates on the GPU, 4. loads the saved
model on a CPU-only path with ``weights_only=True`` and compares its logits with the GPU's, 5.
(``ddp``) runs one epoch of ``multi_gpu_train.json`` under torchrun (NCCL), 6. runs
``scripts/benchmark_train.py`` at each of ``benchmark_sizes`` and keeps its RESULT line. Prints and
writes ``<work_dir>/gpu_check.json`` (logs of every step beside it), rewritten after every step so
that a run cut short keeps what it measured.

The speed goals it checks: the fast path at >= 95% of model-only throughput (``fast_vs_model``),
>= 14,000 img/s at 64 px and >= 2,400 img/s at 224 px on one H100-class GPU, and a 30-epoch 64 px
training run in under 40 s wall.
"""

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start


def check(
    dataset_dir: str,
    work_dir: str,
    epochs: int = 30,
    num_workers: int = 8,
    benchmark_sizes: tuple[int, ...] = (64, 224),
    warm_rerun: bool = True,
    ddp: bool = True,
    benchmark_epochs: int = 3,
) -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check proves the GPU path")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    datalist = work / "datalist.json"
    subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "--dataset_dir", dataset_dir, "--output", str(datalist)],
        cwd=REPO,
        check=True,
    )
    data_args = ["--dataset_dir", dataset_dir, "--datalist", str(datalist), "--num_workers", str(num_workers)]
    common = [*data_args, "--bundle_root", str(work)]
    bundle_run = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    report = {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__, "epochs": epochs}

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    report["config_device"] = str(parser.get_parsed_content("device"))
    report["config_amp"] = bool(parser.get_parsed_content("amp"))

    train = bundle_run + ["configs/train.json", "--max_epochs", str(epochs), "--resume", "false", *common]

    def save():
        (work / "gpu_check.json").write_text(json.dumps(report, indent=1))

    report["train_wall_s"] = _run(train, work / "train.log")  # cold: decodes into <work>/cache first
    save()
    if warm_rerun:
        report["train_warm_cache_wall_s"] = _run(train, work / "train_warm.log")
    report["history"] = json.loads((work / "models" / "history.json").read_text())
    report["evaluate_wall_s"] = _run(
        bundle_run + ["['configs/train.json','configs/evaluate.json']", *common], work / "evaluate.log"
    )
    report["metrics"] = json.loads((work / "eval" / "metrics.json").read_text())

    # the saved weights load on the CPU alone and give the GPU's logits
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    state = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)
    cpu_net = parser.get_parsed_content("network_def").eval()
    cpu_net.load_state_dict(state)
    gpu_net = copy.deepcopy(cpu_net).cuda()
    x = torch.rand(16, 3, 64, 64)
    with torch.no_grad():
        report["cpu_vs_gpu_max_abs_logit_diff"] = float((cpu_net(x) - gpu_net(x.cuda()).cpu()).abs().max())
    report["checkpoint_devices"] = sorted({v.device.type for v in state.values()})
    save()

    if ddp:
        report["ddp_nccl_1gpu_wall_s"] = _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=1",
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                "['configs/train.json','configs/multi_gpu_train.json']",
                "--max_epochs",
                "1",
                "--resume",
                "false",
                *data_args,
                "--bundle_root",
                str(work / "ddp"),
            ],
            work / "ddp.log",
        )
        save()
    for size in benchmark_sizes:
        log = work / f"benchmark_train_{size}.log"
        batch = 1024 if size <= 64 else 256  # the batch sizes of the model-only figures in NOTES-stack.md
        report[f"benchmark_{size}_wall_s"] = _run(
            [
                sys.executable,
                "scripts/benchmark_train.py",
                "--dataset_dir",
                dataset_dir,
                "--image_size",
                str(size),
                "--batch_size",
                str(batch),
                "--epochs",
                str(benchmark_epochs),
                "--data_epochs",
                str(benchmark_epochs),
            ],
            log,
        )
        report[f"benchmark_{size}"] = [line for line in log.read_text().splitlines() if line.startswith("RESULT")]
        save()
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    fire.Fire(check)
