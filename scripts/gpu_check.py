"""Prove the bundle's GPU path on a CUDA machine, with the commands users run.

    python scripts/gpu_check.py --dataset_dir D --work_dir W [--epochs 30] [--benchmark_sizes "[64,224]"]
        [--warm_rerun true] [--ddp true] [--benchmark_epochs 3] [--profile_steps 20]

1. prepares a lesion-level datalist, 2. trains with ``monai.bundle run`` (the config picks cuda,
bf16 AMP and the fast data path by itself), timed from the command's start with a cold cache, 3.
(``profile_steps``, 0 skips it) profiles that training's steps in this process (``profile_training``:
ms/step, the synchronising calls left and where they are made, GPU busy share, kernels per step,
top ops, a chrome trace), then (``warm_rerun``) trains again with the cache from the first run, 4.
evaluates on the GPU, 5. loads the saved model on a CPU-only path with ``weights_only=True`` and
compares its logits with the GPU's, 6. (``ddp``) runs one epoch of ``multi_gpu_train.json`` under
torchrun (NCCL), 7. runs ``scripts/benchmark_train.py`` at each of ``benchmark_sizes`` and keeps its
RESULT line. Prints and writes ``<work_dir>/gpu_check.json`` (logs of every step, and the profile's
``profile.txt`` and ``profile_trace.json.gz``, beside it), rewritten after every step so that a run
cut short keeps what it measured. A failed profile is reported in the JSON and the check goes on.

The speed goals it checks: the fast path at >= 95% of model-only throughput (``fast_vs_model``),
>= 14,000 img/s at 64 px and >= 2,400 img/s at 224 px on one H100-class GPU, and a 30-epoch 64 px
training run in under 40 s wall.
"""

import collections
import contextlib
import copy
import gc
import itertools
import json
import math
import operator
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, create_workflow
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

REPO = Path(__file__).resolve().parents[1]
SYNC_WARNING = "synchronizing CUDA operation"  # the warning of torch's sync debug mode
TOP_OPS, TOP_SYNCS = 15, 10
TRACE_STEPS = 3  # the chrome trace's: a step adds ~0.5 MiB (gzipped) on a CPU, more with CUDA kernels
TRACE_LIMIT_BYTES = 5 * 2**20  # what a GPU session can carry back


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _timed(device: torch.device, result: dict):
    """The block's wall time between device synchronisations, into ``result["seconds"]``."""
    _sync(device)
    started = time.perf_counter()
    yield
    _sync(device)
    result["seconds"] = time.perf_counter() - started


def _where(frame: traceback.FrameSummary) -> str:
    path = frame.filename.split("site-packages/")[-1].removeprefix(f"{REPO}/")
    return f"{path}:{frame.lineno} ({frame.name})"


@contextlib.contextmanager
def _recorded_syncs(syncs: collections.Counter):
    """Counts the sync debug mode's warnings raised in the block by call site: a tuple of the
    synchronising line and its four callers, innermost first. Other warnings are shown as usual."""

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack(limit=16)[:-1] if f.filename != warnings.__file__]
        syncs[tuple(_where(f) for f in reversed(frames[-5:]))] += 1

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every one, not once per line
        show, warnings.showwarning = warnings.showwarning, record
        yield


@contextlib.contextmanager
def _sync_debug(device: torch.device, result: dict):
    """Torch's sync debug mode over the block: each synchronising CUDA call into ``result["syncs"]``."""
    with _recorded_syncs(result.setdefault("syncs", collections.Counter())):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _profiled(device: torch.device, result: dict):
    """torch.profiler over the block (CUDA activity too on a GPU): the profile into ``result["profile"]``,
    the block's wall time (the profiler's start and post-processing left out) into ``result["seconds"]``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profile, _timed(device, result):
        yield
    result["profile"] = profile


def _sync_summary(syncs: collections.Counter, steps: int) -> tuple[dict, str]:
    top = [
        {"per_step": count / steps, "at": stack[0], "callers": list(stack[1:])}
        for stack, count in syncs.most_common(TOP_SYNCS)
    ]
    summary = {"per_step": sum(syncs.values()) / steps, "distinct": len(syncs), "top": top}
    text = [f"synchronisations: {summary['per_step']:.1f} per step at {len(syncs)} call sites; the most frequent:"]
    text += [
        f"{row['per_step']:6.2f}/step  {row['at']}\n              <- " + " <- ".join(row["callers"]) for row in top
    ]
    return summary, "\n".join(text)


def _profile_summary(profile, seconds: float, steps: int) -> tuple[dict, str]:
    """Per step: the wall time under the profiler, the device's time (kernels, copies, fills), the
    share of the wall it was busy and the kernels launched; the top ops by self CPU and by self
    device time, as rows (annotated regions' spans on the device left out) and as torch's tables (the text)."""
    on_device = sorted(  # a region's annotation on the device's timeline spans its gaps: left out, as torch does
        (e for e in profile.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation),
        key=lambda e: e.time_range.start,
    )
    busy_us, end = 0.0, -math.inf
    for event in on_device:  # the union of their intervals: overlapping kernels count once
        busy_us += max(event.time_range.end - max(event.time_range.start, end), 0)
        end = max(end, event.time_range.end)
    summary = {"wall_ms_per_step": 1000 * seconds / steps}
    if on_device:
        kernels = [e for e in on_device if not e.name.startswith(("Memcpy", "Memset"))]
        summary.update(
            device_ms_per_step=sum(e.time_range.elapsed_us() for e in on_device) / 1000 / steps,
            gpu_busy_fraction=busy_us / 1e6 / seconds,
            kernels_per_step=len(kernels) / steps,
            copies_and_fills_per_step=(len(on_device) - len(kernels)) / steps,
        )
    head = "profiler: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items())
    averages, tables = profile.key_averages(), []
    rows = [a for a in averages if not (a.device_type == DeviceType.CUDA and a.is_user_annotation)]
    for attribute in ["self_cpu_time_total", "self_device_time_total"] if on_device else ["self_cpu_time_total"]:
        summary[f"top_{attribute}"] = [
            {
                "op": a.key[:200],
                "calls_per_step": a.count / steps,
                "self_cpu_ms_per_step": a.self_cpu_time_total / 1000 / steps,
                "self_device_ms_per_step": a.self_device_time_total / 1000 / steps,
            }
            for a in sorted(rows, key=operator.attrgetter(attribute), reverse=True)[:TOP_OPS]
        ]
        table = averages.table(sort_by=attribute, row_limit=TOP_OPS, max_name_column_width=80)
        tables.append(f"top {TOP_OPS} ops by {attribute}, over {steps} steps:\n{table}")
    return summary, "\n\n".join([head, *tables])


def _export_trace(profile, path: Path) -> dict:
    """The chrome trace (gzipped: chrome://tracing and Perfetto read it) unless too big to carry back."""
    profile.export_chrome_trace(str(path))
    size = path.stat().st_size
    if size > TRACE_LIMIT_BYTES:
        path.unlink()
        return {"trace_skipped": f"{size / 2**20:.1f} MiB, over {TRACE_LIMIT_BYTES / 2**20:.0f} MiB"}
    return {"trace": path.name, "trace_mib": size / 2**20}


def profile_training(
    dataset_dir: str,
    datalist: Path,
    work: Path,
    steps: int,
    out: dict,
    save: Callable[[], None] = lambda: None,
    **overrides,
) -> None:
    """Where a training step's time goes, in the bundle's own trainer: into ``out`` (``save`` called
    after each part) and ``<work>/profile.txt``.

    Builds and initializes configs/train.json's workflow as ``monai.bundle run`` does (handlers
    included; its files under ``<work>/profile``, the images from the check's cache in
    ``<work>/cache``; ``overrides`` are more config keys), trains an epoch's worth of batches to warm
    up (cuDNN tunes each batch shape the loader cuts), then runs ``steps`` iterations timed, as many
    under torch's sync debug mode (each synchronising call counted by where it is made; CUDA only),
    as many under torch.profiler, and ``TRACE_STEPS`` more profiled for the chrome trace
    (``<work>/profile_trace.json.gz``). All in one epoch, stopped before its end: no validation or
    checkpoint inside.
    """
    started = time.perf_counter()
    workflow = create_workflow(
        config_file=str(REPO / "configs" / "train.json"),
        bundle_root=str(work / "profile"),
        cache_dir=str(work / "cache"),
        dataset_dir=dataset_dir,
        datalist=str(datalist),
        resume=False,
        **overrides,
    )
    parser = workflow.parser
    device = parser.get_parsed_content("device")
    trainer = parser.get_parsed_content("train#trainer")
    warmup = len(parser.get_parsed_content("train#dataloader"))
    phases = [("timed", _timed, steps), ("profiler", _profiled, steps), ("trace", _profiled, min(steps, TRACE_STEPS))]
    if device.type == "cuda":  # sync debug mode is CUDA's
        phases.insert(1, ("syncs", _sync_debug, steps))
    # the iteration that ends the warm-up or a phase -> the phase that starts there
    starts = {end: i for i, end in enumerate(itertools.accumulate([warmup] + [n for _, _, n in phases]))}
    trainer.state.epoch_length = max(starts)
    out.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        image_size=parser.get_parsed_content("image_size"),
        batch_size=parser.get_parsed_content("batch_size"),
        amp=bool(parser.get_parsed_content("amp")),
        warmup_steps=warmup,
        steps=steps,
        setup_s=time.perf_counter() - started,
    )
    save()
    results, images, sections, running = {}, [], [], contextlib.ExitStack()

    def finish(name: str, n: int) -> None:
        result = results[name]
        if name == "timed":
            out[name] = {"ms_per_step": 1000 * result["seconds"] / n, "img_per_s": images[-1] / result["seconds"]}
            section = f"timed: {out[name]['ms_per_step']:.1f} ms/step, {out[name]['img_per_s']:.0f} img/s"
        elif name == "syncs":
            out[name], section = _sync_summary(result["syncs"], n)
        elif name == "profiler":
            out[name], section = _profile_summary(result["profile"], result["seconds"], n)
            if "timed" in out and "device_ms_per_step" in out[name]:
                out[name]["device_ms_vs_timed_step"] = out[name]["device_ms_per_step"] / out["timed"]["ms_per_step"]
        else:
            out[name] = {"steps": n, **_export_trace(result["profile"], work / "profile_trace.json.gz")}
            section = f"trace: {out[name]}"
        sections.append(section)
        head = json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)})
        (work / "profile.txt").write_text("\n\n".join([head, *sections]) + "\n")
        save()

    @trainer.on(Events.ITERATION_COMPLETED)  # after the bundle's own handlers: a step includes them and the next batch
    def advance(engine) -> None:
        if engine.state.iteration > warmup:
            images[-1] += engine.state.batch["image"].shape[0]
        index = starts.get(engine.state.iteration)
        if index is None:
            return
        if index == 0:
            _sync(device)
            out["warmup_s"] = time.perf_counter() - started - out["setup_s"]
        else:
            running.close()
            name, _, n = phases[index - 1]
            finish(name, n)
        if index == len(phases):
            engine.terminate(skip_completed=True)
            return
        name, context, _ = phases[index]
        images.append(0)
        running.enter_context(context(device, results.setdefault(name, {})))

    try:
        workflow.run()
    finally:
        running.close()  # a failure must not leave the profiler or sync debug mode on
    out["wall_s"] = time.perf_counter() - started
    save()


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
    profile_steps: int = 20,
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
    if profile_steps:
        report["profile"] = {}
        try:
            profile_training(str(REPO / dataset_dir), datalist, work, profile_steps, report["profile"], save)
            gc.collect()  # the trainer's handlers hold it in reference cycles: free its GPU memory for the later steps
            torch.cuda.empty_cache()
        except Exception:  # reported; the later steps still run
            report["profile"]["error"] = traceback.format_exc()
            print(report["profile"]["error"], file=sys.stderr)
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
