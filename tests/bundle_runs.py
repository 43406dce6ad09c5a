"""Running the bundle the way users do: ``python -m monai.bundle run`` in a subprocess, from the repo root."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = "configs/train.json"
TRAIN_CHAIN = "['configs/train.json','configs/train_chain.json']"
EVALUATE = "['configs/train.json','configs/evaluate.json']"
EVALUATE_CHAIN = "['configs/train.json','configs/train_chain.json','configs/evaluate.json']"
MULTI_GPU = "['configs/train.json','configs/multi_gpu_train.json']"
INFERENCE = "configs/inference.json"

# Small and fast on 2 CPU cores; the synthetic classes stay separable at this size.
FAST = {"image_size": "[32,32]", "batch_size": 32, "num_workers": 0}


def bundle_command(config_file: str, launcher: tuple[str, ...] = (sys.executable,), **overrides) -> list[str]:
    command = [*launcher, "-m", "monai.bundle", "run", "--config_file", config_file]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def run_bundle(
    config_file: str,
    expect_ok: bool = True,
    launcher: tuple[str, ...] = (sys.executable,),
    timeout: float = 600,
    **overrides,
) -> subprocess.CompletedProcess:
    """Run one bundle command to completion; on an unexpected outcome fail with its output."""
    result = subprocess.run(
        bundle_command(config_file, launcher, **overrides),
        cwd=REPO,
        env=bundle_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if (result.returncode == 0) != expect_ok:
        raise AssertionError(
            f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def bundle_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    env.pop("RANK", None)
    return env


def finished_pid() -> int:
    """The pid of a process that has ended (for files named after their writer's pid)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
