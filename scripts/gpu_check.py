"""Prove the bundle's GPU path and measure every training-speed goal on a CUDA machine, in one command.

    python scripts/gpu_check.py --dataset_dir D --work_dir W [--epochs 30] [--speed_sizes "[64,128]"]
        [--recipes '{"ham128": {"config": ["configs/train_ham10000.json"]}}'] [--seeds "[0,1,2]"]
        [--parallel 4] [--train_overrides '{"cudnn_benchmark": false}'] [--profile_steps 20]
        [--warm_rerun true] [--ddp true] [--benchmark_sizes "[64,224]"]

``check`` says what runs, in which order. Everything is measured with the commands and the trainer
users run: ``monai.bundle run`` processes for the wall times and the first step (read from the
bundle's own log line, ``bundle.training.FirstStepTimer``), train.json's workflow built as that
command builds it for the trainer-against-model comparison (``trainer_vs_model_only``) and the step
profile (``profile_training``), and ``scripts/run_recipes.py`` for the recipe runs side by side.
Prints and writes ``<work_dir>/gpu_check.json`` (logs of every step beside it), rewritten after every
part so that a run cut short keeps what it measured.

The goals (issue 16, on one H100/H200-class GPU): the trainer at >= 0.9x the model alone at 64 and
128 px (``trainer_vs_model_only``) and >= 0.95x at 64 and 224 px; the first training step <= 10 s
after the command's start with a warm cache, <= 20 s cold (``first_step_s``); the 128 px recipe in
<= 45 s (``recipe_wall_s``) and the 30-epoch 64 px run in <= 40 s (``train_wall_s``); several recipe
runs side by side against one alone (``parallel``).
"""

import collections
import contextlib
import copy
import gc
import itertools
import json
import math
import operator
import re
import statistics
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

from bundle.flags import as_bool

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_recipes  # noqa: E402  (a sibling script: its command-line overrides)

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


def _training_workflow(dataset_dir: str, datalist: Path, work: Path, name: str, overrides: dict):
    """configs/train.json's workflow as ``monai.bundle run`` builds it, its files in ``<work>/<name>`` and its
    images from ``<work>/cache``: ``(workflow, device, trainer, batches per epoch)``."""
    workflow = create_workflow(
        config_file=str(REPO / "configs" / "train.json"),
        bundle_root=str(work / name),
        cache_dir=str(work / "cache"),
        dataset_dir=dataset_dir,
        datalist=str(datalist),
        resume=False,
        **overrides,
    )
    parser = workflow.parser
    trainer = parser.get_parsed_content("train#trainer")
    return workflow, parser.get_parsed_content("device"), trainer, len(parser.get_parsed_content("train#dataloader"))


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
    workflow, device, trainer, warmup = _training_workflow(dataset_dir, datalist, work, "profile", overrides)
    parser = workflow.parser
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
        amp=as_bool(parser.get_parsed_content("amp"), "amp"),
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


def trainer_vs_model_only(
    dataset_dir: str,
    datalist: Path,
    work: Path,
    steps: int,
    out: dict,
    save: Callable[[], None] = lambda: None,
    **overrides,
) -> None:
    """The bundle's trainer (loader, augmentation, every handler) against the model alone, in one process,
    with the same network, optimizer, loss, batch size and precision: into ``out``.

    Builds configs/train.json's workflow as ``monai.bundle run`` does (files in ``<work>/speed``, images
    from ``<work>/cache``), trains an epoch to warm up (cuDNN tuning, the CUDA graph's capture), then
    times ``steps`` trainer iterations as configured (``trainer``: a replayed graph on a GPU) and as many
    with the step forced eager (``trainer_eager``), each from one device synchronisation to the next.
    Then, on the last batch the loader made, the step function alone in a loop: eager
    (``model_only_eager``: ``bundle.training.trainer_iteration``) and replayed as a graph
    (``model_only_graphed``). ``trainer_vs_model_only`` is the trainer's img/s over the faster model-only
    loop's; ``graph_speedup`` the graphed trainer's over the eager one's. Last, validation's forward
    passes with the test-time views batched or not (``validation_views``).
    """
    from bundle.training import GraphedTrainerIteration, trainer_iteration

    started = time.perf_counter()
    workflow, device, trainer, warmup = _training_workflow(dataset_dir, datalist, work, "speed", overrides)
    parser = workflow.parser
    iteration = trainer._process_function
    out.update(
        image_size=parser.get_parsed_content("image_size"),
        batch_size=parser.get_parsed_content("batch_size"),
        amp=as_bool(parser.get_parsed_content("amp"), "amp"),
        setup_s=time.perf_counter() - started,
    )
    phases = ["trainer", "trainer_eager"]
    ends = {warmup: 0, warmup + steps: 1, warmup + 2 * steps: 2}
    marks: dict[str, float] = {}
    images = collections.Counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def advance(engine) -> None:
        phase = ends.get(engine.state.iteration)
        if engine.state.iteration > warmup:
            images[phases[min((engine.state.iteration - warmup - 1) // steps, 1)]] += len(engine.state.batch["image"])
        if phase is None:
            return
        _sync(device)
        now = time.perf_counter()
        if phase == 0:
            out["warmup_s"] = now - started - out["setup_s"]
        else:
            name = phases[phase - 1]
            out[name] = {
                "img_per_s": images[name] / (now - marks[name]),
                "ms_per_step": 1000 * (now - marks[name]) / steps,
            }
            save()
        if phase == len(phases):
            engine.terminate()
            return
        if phases[phase] == "trainer_eager" and isinstance(iteration, GraphedTrainerIteration):
            iteration.reason = "measuring the eager step"
            # the graph's memory pool holds a whole step's activations: beside the eager step's own, at 224 px
            # and batch 512 (~31 GiB each in bf16) they may not fit an H100 together. The gradients the graph
            # wrote live in its pool too: set to None, the eager step allocates its own.
            iteration.graphs.clear()
            engine.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        marks[phases[phase]] = time.perf_counter()

    trainer.state.epoch_length = warmup + 2 * steps
    workflow.run()

    batch = dict(trainer.state.batch)
    size = len(batch["image"])
    graphed = GraphedTrainerIteration(enabled=True, warmup_steps=1)
    for name, step in [("model_only_eager", trainer_iteration), ("model_only_graphed", graphed)]:
        if name == "model_only_graphed" and not graphed.usable(trainer):
            out[name] = {"skipped": graphed.reason}
            continue
        for _ in range(3):
            step(trainer, batch)
        _sync(device)
        begun = time.perf_counter()
        for _ in range(steps):
            step(trainer, batch)
        _sync(device)
        seconds = time.perf_counter() - begun
        out[name] = {"img_per_s": steps * size / seconds, "ms_per_step": 1000 * seconds / steps}
        save()
    out["validation_views"] = validation_views(parser, device)
    save()
    if device.type == "cuda":
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    model_only = max(out[name].get("img_per_s", 0) for name in ("model_only_eager", "model_only_graphed"))
    out["trainer_vs_model_only"] = out["trainer"]["img_per_s"] / model_only
    out["graph_speedup"] = out["trainer"]["img_per_s"] / out["trainer_eager"]["img_per_s"]
    out["wall_s"] = time.perf_counter() - started
    save()


def validation_views(parser, device: torch.device, rounds: int = 3) -> dict:
    """Validation's forward passes over its batches, with its network, precision and test-time views: one
    pass per view against all the views as one batch (``tta_batched``), each warmed up once (cuDNN tunes
    the new shapes), then timed ``rounds`` times in turn; the medians and ``batched_speedup``."""
    inferer = parser.get_parsed_content("validate#inferer")
    network = parser.get_parsed_content("validate#network").eval()
    batches = [batch["image"] for batch in parser.get_parsed_content("validate#dataloader")]
    amp = as_bool(parser.get_parsed_content("amp"), "amp")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode(), torch.autocast(device.type, **parser.get_parsed_content("amp_kwargs"), enabled=amp):
        for timed in [False] + [True] * rounds:
            for batched in (False, True):
                inferer.batched = batched
                _sync(device)
                began = time.perf_counter()
                for images in batches:
                    inferer(images, network)
                _sync(device)
                if timed:
                    seconds[batched].append(time.perf_counter() - began)
    per_view, together = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {
        "images": sum(len(images) for images in batches),
        "batches": len(batches),
        "views": inferer.views,
        "per_view_s": per_view,
        "batched_s": together,
        "batched_speedup": per_view / together,
    }


FIRST_STEP = re.compile(r"first training step done ([0-9.]+) s after the process started")


def first_step_s(log: Path) -> float | None:
    """Seconds from a bundle command's start to the end of its first training step, as its log says
    (``bundle.training.FirstStepTimer``)."""
    found = FIRST_STEP.search(log.read_text()) if log.is_file() else None
    return float(found.group(1)) if found else None


class StepFailed(RuntimeError):
    """A command of the check exited with an error; its log's tail is the message."""


def _run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise StepFailed(f"failed ({result.returncode}): {' '.join(command)}\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start


@contextlib.contextmanager
def _recorded_failure(into: dict, key: str, save: Callable[[], None]):
    """A failing part of the check leaves its traceback in ``into[key]`` and the check goes on to the next part:
    a GPU session is too scarce to end at its first failure."""
    try:
        yield
    except Exception:  # StepFailed, or reading what the step should have written
        into[key] = traceback.format_exc()
        print(f"{key} failed; the check goes on:\n{into[key]}", file=sys.stderr)
        save()


DEFAULT_RECIPES = {"ham128": {"config": ["configs/train_ham10000.json"]}}


def check(
    dataset_dir: str,
    work_dir: str,
    epochs: int = 30,
    speed_sizes: tuple[int, ...] = (64, 128),
    speed_steps: int = 30,
    recipes: dict | None = None,
    seeds: list[int] | None = None,
    parallel: int = 4,
    recipe_timeout_s: float | None = None,
    train_overrides: dict | None = None,
    require_cuda: bool = True,
    evaluate: bool = True,
    benchmark_sizes: tuple[int, ...] = (),
    warm_rerun: bool = False,
    ddp: bool = False,
    benchmark_epochs: int = 3,
    profile_steps: int = 0,
) -> None:
    """Every GPU goal in one command, in this order (each part saved as soon as it ends):

    1. ``train_wall_s``: the 30-epoch 64 px ``monai.bundle run`` from its start, cold cache
       (``first_step_s.cold``: from its launch to the end of its first training step);
    2. (``evaluate``) its evaluation on the GPU and the CPU-vs-GPU logits check;
    3. ``trainer_vs_model_only`` and ``tta_batched_speedup`` (validation's views as one batch against one pass
       per view) at each of ``speed_sizes`` (``speed`` holds the details);
    4. (``profile_steps``) the step profile (``profile_training``);
    5. ``recipes`` (default: the 128 px overlay) through ``scripts/run_recipes.py`` per seed, the first run
       alone (``recipe_wall_s``, ``first_step_s.warm``: its images were cached by step 3), then the others
       ``parallel`` at a time (``parallel``: summed img/s against alone); its rows in ``recipes``;
    6. optional: ``warm_rerun``, ``ddp`` (one epoch under torchrun), ``benchmark_sizes`` (benchmark_train.py).

    ``epochs`` 0 skips 1-2, an empty ``speed_sizes`` 3, ``recipes`` ``{}`` 5. ``train_overrides`` (config keys,
    e.g. ``{"cuda_graphs": false}``) go to every training. ``run_recipes.py`` lowers ``parallel`` to what the
    GPU's memory holds, judged from the first run's peak. A part that fails leaves its traceback (in ``errors``,
    or in the ``error`` of its speed size or of ``profile``) and the next part runs.
    """
    overrides = dict(train_overrides or {})
    evaluate, warm_rerun, ddp, require_cuda = (
        as_bool(v, k)
        for k, v in [
            ("--evaluate", evaluate),
            ("--warm_rerun", warm_rerun),
            ("--ddp", ddp),
            ("--require_cuda", require_cuda),
        ]
    )
    cuda = torch.cuda.is_available()
    if not cuda and require_cuda:  # require_cuda false: the tests run the whole check on a CPU
        sys.exit("no CUDA device: this check proves the GPU path")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    dataset_dir = str(Path(dataset_dir).resolve())  # one spelling of the paths: the caches are keyed by them
    datalist = work / "datalist.json"
    subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "--dataset_dir", dataset_dir, "--output", str(datalist)],
        cwd=REPO,
        check=True,
    )
    data_args = ["--dataset_dir", dataset_dir, "--datalist", str(datalist)]
    common = [*data_args, "--bundle_root", str(work), "--cache_dir", str(work / "cache")]
    bundle_run = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    report = {
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "epochs": epochs,
    }

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    report["config_device"] = str(parser.get_parsed_content("device"))
    report["config_amp"] = as_bool(parser.get_parsed_content("amp"), "amp")

    train = bundle_run + ["configs/train.json", "--max_epochs", str(epochs), "--resume", "false", *common]
    train += run_recipes._overrides(overrides)

    def save():
        (work / "gpu_check.json").write_text(json.dumps(report, indent=1))

    report["errors"] = errors = {}  # part: traceback, for the parts that failed
    report["first_step_s"] = {}
    trained = False
    if epochs:
        with _recorded_failure(errors, "train", save):
            report["train_wall_s"] = _run(train, work / "train.log")  # cold: decodes into <work>/cache first
            report["first_step_s"]["cold"] = first_step_s(work / "train.log")
            report["history"] = json.loads((work / "models" / "history.json").read_text())
            trained = True
            save()
    if trained and evaluate:
        with _recorded_failure(errors, "evaluate", save):
            report["evaluate_wall_s"] = _run(
                bundle_run
                + ["['configs/train.json','configs/evaluate.json']", *common, *run_recipes._overrides(overrides)],
                work / "evaluate.log",
            )
            report["metrics"] = json.loads((work / "eval" / "metrics.json").read_text())
            if cuda:
                report["cpu_vs_gpu_max_abs_logit_diff"], report["checkpoint_devices"] = _cpu_matches_gpu(work)
            save()
    report["speed"], report["trainer_vs_model_only"], report["tta_batched_speedup"] = {}, {}, {}
    for size in speed_sizes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        part = report["speed"][str(size)] = {}
        with _recorded_failure(part, "error", save):
            trainer_vs_model_only(
                dataset_dir, datalist, work, speed_steps, part, save, **{**overrides, "image_size": [size, size]}
            )
            report["trainer_vs_model_only"][str(size)] = part["trainer_vs_model_only"]
            report["tta_batched_speedup"][str(size)] = part["validation_views"]["batched_speedup"]
        gc.collect()  # the trainer's handlers hold it in reference cycles: free its GPU memory
        torch.cuda.empty_cache()
        save()
    if profile_steps:
        report["profile"] = {}
        with _recorded_failure(report["profile"], "error", save):
            profile_training(dataset_dir, datalist, work, profile_steps, report["profile"], save)
        gc.collect()
        torch.cuda.empty_cache()
        save()
    if recipes == {}:
        save()
        print(json.dumps({k: v for k, v in report.items() if k not in ("history", "metrics")}, indent=1))
        return
    recipes = {name: {**options, **overrides} for name, options in (recipes or DEFAULT_RECIPES).items()}
    recipe_work = work / "recipes"
    recipe_command = [
        sys.executable,
        "scripts/run_recipes.py",
        "--dataset_dir",
        dataset_dir,
        "--work_dir",
        str(recipe_work),
        "--cache_dir",
        str(work / "cache"),
        "--runs",
        json.dumps(recipes),
        "--parallel",
        str(parallel),
        "--alone_first",
        "true",
    ]
    if seeds:
        recipe_command += ["--seeds", json.dumps(list(seeds))]
    if recipe_timeout_s:
        recipe_command += ["--timeout_s", str(recipe_timeout_s)]
    recipe_work.mkdir(parents=True, exist_ok=True)
    with _recorded_failure(errors, "recipes", save):  # the runs that finished are read below all the same
        report["recipes_wall_s"] = _run(recipe_command, work / "recipes.log")
    rows = (
        [json.loads(line) for line in (recipe_work / "runs.jsonl").read_text().splitlines()]
        if (recipe_work / "runs.jsonl").is_file()
        else []
    )
    report["recipes"] = rows
    if rows:
        report["recipe_wall_s"] = rows[0]["train_wall_s"]
        report["first_step_s"]["warm"] = first_step_s(recipe_work / rows[0]["name"] / "train.log")
    if (recipe_work / "parallel.json").is_file():
        report["parallel"] = json.loads((recipe_work / "parallel.json").read_text())
    save()

    if warm_rerun:
        with _recorded_failure(errors, "warm_rerun", save):
            report["train_warm_cache_wall_s"] = _run(train, work / "train_warm.log")
            save()
    if ddp:
        ddp_train = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "monai.bundle", "run"]
        ddp_train += ["--config_file", "['configs/train.json','configs/multi_gpu_train.json']", "--max_epochs", "1"]
        ddp_train += ["--resume", "false", *data_args, "--bundle_root", str(work / "ddp")]
        with _recorded_failure(errors, "ddp", save):
            report["ddp_nccl_1gpu_wall_s"] = _run(ddp_train, work / "ddp.log")
            save()
    for size in benchmark_sizes:
        log = work / f"benchmark_train_{size}.log"
        batch = 1024 if size <= 64 else 256  # the batch sizes of the earlier model-only figures (docs/PERFORMANCE.md)
        benchmark = [sys.executable, "scripts/benchmark_train.py", "--dataset_dir", dataset_dir, "--image_size"]
        benchmark += [str(size), "--batch_size", str(batch), "--epochs", str(benchmark_epochs)]
        benchmark += ["--data_epochs", str(benchmark_epochs)]
        with _recorded_failure(errors, f"benchmark_{size}", save):
            report[f"benchmark_{size}_wall_s"] = _run(benchmark, log)
            report[f"benchmark_{size}"] = [line for line in log.read_text().splitlines() if line.startswith("RESULT")]
            save()
    print(json.dumps({k: v for k, v in report.items() if k not in ("history", "recipes", "metrics")}, indent=1))


def _cpu_matches_gpu(work: Path) -> tuple[float, list[str]]:
    """The saved weights load on the CPU alone and give the GPU's logits: the largest difference, and the
    devices the checkpoint's tensors name."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    state = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)
    cpu_net = parser.get_parsed_content("network_def").eval()
    cpu_net.load_state_dict(state)
    gpu_net = copy.deepcopy(cpu_net).cuda()
    x = torch.rand(16, 3, 64, 64)
    with torch.no_grad():
        difference = float((cpu_net(x) - gpu_net(x.cuda()).cpu()).abs().max())
    return difference, sorted({v.device.type for v in state.values()})


if __name__ == "__main__":
    fire.Fire(check)
