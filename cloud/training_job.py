"""The SageMaker training container's side: read the SM_* contract, train and evaluate the bundle, and
leave what an endpoint needs in SM_MODEL_DIR and the metrics and plots in SM_OUTPUT_DATA_DIR.

One process, or one of several under torchrun (the SDK's ``torchrun_driver.py`` starts one per GPU on
every host, setting RANK and WORLD_SIZE): every rank reads the data channel, writes its datalist (the
seeded split is the same everywhere) and runs ``monai.bundle run`` with ``multi_gpu_train.json``
merged in, inheriting torchrun's variables; only rank 0 then evaluates and writes results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cloud.hyperparameters import HyperparameterError, job_settings, split

REPO = Path(__file__).resolve().parents[1]
CHANNEL = "training"
TRAIN = "configs/train.json"
TRAIN_DDP = "['configs/train.json','configs/multi_gpu_train.json']"
EVALUATE = "['configs/train.json','configs/evaluate.json']"
# What evaluation and training leave that belongs in SM_OUTPUT_DATA_DIR (SageMaker uploads it as output.tar.gz):
# every file of the evaluation's output folder (metrics, predictions, plots), the datalist, and from the
# checkpoint folder the history and the sidecar.
EVAL_DIR = "eval"
OUTPUTS = ("datalist.json",)
CHECKPOINT_OUTPUTS = ("history.json", "model.json")
# How much of a failed bundle run's stderr is kept to find its cause (a MONAI traceback runs to ~8 kB).
STDERR_TAIL = 256 * 1024


class JobError(RuntimeError):
    """The job cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class Container:
    """The parts of the training container's environment the job reads."""

    model_dir: Path
    output_data_dir: Path
    data_dir: Path | None
    host: str
    host_count: int
    num_gpus: int
    rank: int
    world_size: int
    hyperparameters: dict
    job_name: str = ""

    @classmethod
    def from_env(cls, env: dict, argv: list[str]) -> Container:
        missing = [name for name in ("SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR") if not env.get(name)]
        if missing:
            raise JobError(
                f"{', '.join(missing)} not set: run this inside a SageMaker training job, or set "
                "SM_MODEL_DIR, SM_OUTPUT_DATA_DIR and SM_CHANNEL_TRAINING yourself"
            )
        channel = env.get(f"SM_CHANNEL_{CHANNEL.upper()}")
        hosts = json.loads(env.get("SM_HOSTS") or "[]")
        # absolute: the bundle's runs start in the repository, whatever the folder this was started from
        return cls(
            model_dir=Path(env["SM_MODEL_DIR"]).absolute(),
            output_data_dir=Path(env["SM_OUTPUT_DATA_DIR"]).absolute(),
            data_dir=Path(channel).absolute() if channel else None,
            host=env.get("SM_CURRENT_HOST", "local"),
            host_count=int(env.get("SM_HOST_COUNT") or len(hosts) or 1),
            num_gpus=int(env.get("SM_NUM_GPUS") or 0),
            rank=int(env.get("RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            hyperparameters=json.loads(env.get("SM_HPS") or "{}") | cli_hyperparameters(argv),
            job_name=env.get("TRAINING_JOB_NAME", ""),
        )


def cli_hyperparameters(argv: list[str]) -> dict[str, str]:
    """``--key value`` pairs (as the SDK's drivers pass them; ``--key=value`` too) as a dict of strings."""
    parsed, rest = {}, list(argv)
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--") or len(flag) == 2:
            raise HyperparameterError(f"expected --key value, got {flag!r}")
        key, equals, value = flag[2:].partition("=")
        if not equals:
            if not rest:
                raise HyperparameterError(f"hyperparameter --{key} has no value")
            value = rest.pop(0)
        parsed[key] = value
    return parsed


def check_data_dir(data_dir: Path | None) -> Path:
    if data_dir is None:
        raise JobError(
            f"no '{CHANNEL}' data channel (SM_CHANNEL_{CHANNEL.upper()} is not set): launch the job "
            "with the HAM10000 folder's S3 URI as its training data"
        )
    if not data_dir.is_dir():
        raise JobError(f"the '{CHANNEL}' channel {data_dir} is not a directory")
    if not any(data_dir.iterdir()):
        raise JobError(f"the '{CHANNEL}' channel {data_dir} is empty: the S3 prefix holds no files")
    return data_dir


def bundle_command(config_file: str, overrides: dict[str, str]) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file]
    for key, value in overrides.items():
        command += [f"--{key}", value]
    return command


def run_bundle(config_file: str, overrides: dict[str, str], what: str) -> None:
    """Run one bundle command from the bundle root, its output going to the job's log.

    Its stderr passes through as it comes, and its end is kept: when the run fails, the exception that
    caused it becomes the JobError's message, so the job's failure reason says why (e.g. a resume
    checkpoint of another dataset) rather than only that it failed.
    """
    print(
        f"[rank {os.environ.get('RANK', '0')}] {what}: {' '.join(bundle_command(config_file, overrides))}", flush=True
    )
    process = subprocess.Popen(bundle_command(config_file, overrides), cwd=REPO, stderr=subprocess.PIPE)
    tail = bytearray()
    while chunk := os.read(process.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail = (tail + chunk)[-STDERR_TAIL:]
    process.stderr.close()
    returncode = process.wait()
    if returncode != 0:
        cause = failure_cause(tail.decode(errors="replace"))
        raise JobError(
            f"{what} failed (monai.bundle exit status {returncode})"
            + (f": {cause}" if cause else "; its output is above")
        )


EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?$")


def failure_cause(stderr: str) -> str | None:
    """The exception at the root of the last traceback in ``stderr``: Python prints a chain's cause
    first, and MONAI wraps a failing config expression in a RuntimeError naming only the expression."""
    lines = stderr.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    # the last chain: its first traceback follows the last line that is neither traceback nor chaining text
    first = starts[-1]
    for index in reversed(starts[:-1]):
        between = lines[index:first]
        if not any("direct cause of the following" in line or "another exception occurred" in line for line in between):
            break
        first = index
    for line in lines[first:]:
        if EXCEPTION_LINE.match(line):
            return line.strip()
    return None


def run(container: Container, work_dir: Path) -> None:
    """Train (and evaluate) in ``work_dir``; on rank 0, fill the model and output folders."""
    overrides, settings = split(container.hyperparameters)
    settings = job_settings(settings)
    if container.host_count > 1 and container.world_size == 1:
        raise JobError(
            f"{container.host_count} hosts but no torchrun: launch multi-instance jobs with "
            "--distributed (Torchrun), or each host would train on its own"
        )
    data_dir = check_data_dir(container.data_dir)
    if container.num_gpus > 1 and container.world_size == 1:
        print(
            f"warning: {container.num_gpus} GPUs but one process, which uses one of them: launch with "
            "--torchrun (one process per GPU)",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"[{container.host} rank {container.rank} of {container.world_size}] data {data_dir}, "
        f"hyperparameters {container.hyperparameters}",
        flush=True,
    )

    from bundle import data  # after the cheap checks: imports numpy, PIL

    records = data.read_ham10000(data_dir)
    splits = data.split_by_lesion(
        records, val_frac=settings["val_frac"], test_frac=settings["test_frac"], seed=settings["split_seed"]
    )
    datalist = data.write_datalist(splits, work_dir / "datalist.json", data_dir)
    ckpt_dir = checkpoint_dir(work_dir, settings)
    if settings["checkpoint_dir"]:
        overrides = restart_resumes(ckpt_dir, overrides, container)
    paths = {
        "bundle_root": str(work_dir),
        "ckpt_dir": str(ckpt_dir),
        "dataset_dir": str(data_dir),
        "datalist": str(datalist),
    }
    if settings["tensorboard_dir"]:
        # one folder per job: TensorBoard pointed at the S3 prefix then shows each job as a run of its own
        paths["tensorboard_dir"] = str(Path(settings["tensorboard_dir"]) / (container.job_name or "local"))
    distributed = container.world_size > 1
    run_bundle(
        TRAIN_DDP if distributed else TRAIN,
        paths | overrides,
        f"training on {container.world_size} process(es)" if distributed else "training",
    )
    if container.rank != 0:
        return
    if settings["evaluate"]:
        run_bundle(EVALUATE, paths | overrides, "evaluation")
    write_results(work_dir, Path(paths["ckpt_dir"]), container)


def checkpoint_dir(work_dir: Path, settings: dict) -> Path:
    """The bundle's ckpt_dir: the job's checkpoint folder when it has one (a run restarted on it resumes
    from its checkpoint_last.pt, keeping its history and best model), else a scratch folder."""
    if not settings["checkpoint_dir"]:
        return work_dir / "models"
    folder = Path(settings["checkpoint_dir"]).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def restart_resumes(folder: Path, overrides: dict[str, str], container: Container) -> dict[str, str]:
    """``resume false`` starts the job over once. SageMaker hands a restarted job (a reclaimed spot instance, a
    retry) the same hyperparameters, so taken as such every restart would start over again. Each rank marks the
    checkpoint folder with the job's name when it starts (the mark syncs to S3 with the checkpoints): a rank
    that finds its own job's mark is a restart, and resumes. On the first start rank 0 removes the earlier
    checkpoint, so that a restart within the first epoch does not resume that one."""
    from bundle.flags import as_bool

    mark = folder / f".job-rank{container.rank}.json"
    restart = mark.is_file() and json.loads(mark.read_text()).get("job") == container.job_name
    mark.write_text(json.dumps({"job": container.job_name}))
    if as_bool(overrides.get("resume", "true"), "resume") or not container.job_name:
        return overrides
    if restart:
        print(f"{container.job_name} restarted: resuming its own checkpoint despite resume false", flush=True)
        return overrides | {"resume": "true"}
    if container.rank == 0:
        (folder / "checkpoint_last.pt").unlink(missing_ok=True)
    return overrides


def write_results(work_dir: Path, ckpt_dir: Path, container: Container) -> None:
    from cloud.model_dir import model_files, write_directory

    write_directory(model_files(REPO, ckpt_dir / "model.pt"), container.model_dir)
    container.output_data_dir.mkdir(parents=True, exist_ok=True)
    evaluated = sorted((work_dir / EVAL_DIR).glob("*"))
    found = evaluated + [work_dir / name for name in OUTPUTS] + [ckpt_dir / name for name in CHECKPOINT_OUTPUTS]
    for path in found:
        if path.is_file():
            shutil.copyfile(path, container.output_data_dir / path.name)
    print(
        f"model directory {container.model_dir} (the endpoint's model.tar.gz); metrics and plots in "
        f"{container.output_data_dir}",
        flush=True,
    )


def main(argv: list[str], env: dict) -> int:
    """The entry script: 0 on success; otherwise the reason on stderr and in SM_OUTPUT_FAILURE."""
    try:
        container = Container.from_env(env, argv)
        with tempfile.TemporaryDirectory(prefix=f"skin-lesion-rank{container.rank}-") as work_dir:
            run(container, Path(work_dir))
    except (JobError, ValueError) as error:  # ValueError: HyperparameterError, DatasetError, bad SM_* values
        message = f"error: {error}"
        print(message, file=sys.stderr, flush=True)
        failure = env.get("SM_OUTPUT_FAILURE")
        if failure and Path(failure).parent.is_dir() and not Path(failure).exists():
            Path(failure).write_text(message + "\n")
        return 2
    return 0
