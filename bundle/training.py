"""What every training run needs, whichever data path feeds it: seeding, the learning rate for the
batch size, the trainer's iteration (eager, or replayed as a CUDA graph on a GPU) and the cold-start timer."""

import logging
import math
import os
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import set_determinism

from bundle.flags import as_bool

logger = logging.getLogger(__name__)

LR_SCALING = ("linear", "sqrt", "none")


def seed_run(seed: int, cudnn_benchmark: bool) -> None:
    """MONAI's ``set_determinism``, then cuDNN autotuning back on if asked (it switches it off):
    autotuned convolutions are much faster on a GPU but not bit-reproducible."""
    set_determinism(seed=seed)
    if as_bool(cudnn_benchmark, "cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def scaled_learning_rate(learning_rate: float, batch_size: int, reference_batch_size: int, scaling: str) -> float:
    """``learning_rate`` (tuned at ``reference_batch_size``) scaled to ``batch_size``.

    "sqrt" (the default; suits Adam) multiplies by sqrt(batch_size / reference), "linear" by the
    ratio itself (suits SGD), "none" leaves it.
    """
    if scaling not in LR_SCALING:
        raise ValueError(f"config key 'lr_scaling' must be one of {LR_SCALING}, got {scaling!r}")
    ratio = int(batch_size) / int(reference_batch_size)
    return float(learning_rate) * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[scaling]


def trainer_iteration(engine, batchdata) -> list[dict]:
    """SupervisedTrainer's own iteration without two of its waits for the GPU.

    - Its whole-batch output is handed on as a one-item list. MONAI's handlers (StatsHandler,
      MLFlowHandler, ...) read the loss with ``from_engine(["loss"], first=True)``, i.e. from the first
      item of a decollated batch. Decollating a training batch splits it per image and turns each label
      into a Python int: one GPU sync per label, about a tenth of a 64-px step. The trainer runs with
      ``decollate: false`` and this iteration instead, so the loss is where those handlers look and
      nothing is split.
    - Under bfloat16 autocast MONAI's loss scaler is switched off: bfloat16 has float32's exponent
      range, so no gradient underflows for it to rescue, and its overflow check reads a flag back
      from the GPU every step.
    """
    scaler = getattr(engine, "scaler", None)
    if scaler is not None and scaler.is_enabled() and engine.amp_kwargs.get("dtype") == torch.bfloat16:
        engine.scaler = torch.amp.GradScaler(enabled=False)
    return [engine._iteration(engine, batchdata)]


class GraphedTrainerIteration:
    """``trainer_iteration`` with the whole training step replayed as one CUDA graph on a GPU.

    A DenseNet121 step is ~2,700 small kernels; launched one by one from Python the GPU sits idle most
    of the step waiting for the next launch (docs/PERFORMANCE.md). Here the forward pass, the loss,
    the backward pass and the optimizer step are captured once per batch shape and replayed: one
    launch a step. Every batch shape first runs ``warmup_steps`` ordinary steps (on a side stream, as
    CUDA graph capture requires; cuDNN tunes its convolutions there), then is captured; each replay
    copies the batch into the graph's static inputs. At most ``max_graphs`` shapes are captured (a
    training epoch has one or two), others run eagerly.

    The steps are the trainer's own: same network, loss, optimizer and autocast, so a replay computes
    what an eager step computes. The optimizer must be able to run inside a graph: its learning rate
    becomes a device tensor that the scheduler fills in place (so the schedule reaches the replays) and
    its ``capturable`` flag is set; AdamW fused (train.json's choice on a GPU) qualifies. Anything else
    runs the eager ``trainer_iteration`` unchanged: a CPU, ``enabled`` false, a memory-mapped image cache,
    fp16 loss scaling, gradient accumulation, DistributedDataParallel, ``torch.compile`` or an optimizer
    without a device step count. The handlers see the same output keys; the graph's prediction and loss tensors are
    overwritten by the next step, so a handler keeping them must copy them (the bundle's read or
    sum them within the step).
    """

    def __init__(self, enabled: bool = True, warmup_steps: int = 3, max_graphs: int = 2) -> None:
        self.enabled = as_bool(enabled, "cuda_graphs")
        self.warmup_steps = int(warmup_steps)
        self.max_graphs = int(max_graphs)
        self.graphs: dict[tuple, dict] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.reason: str | None = None  # why the step runs eagerly, once decided
        self._stream: torch.cuda.Stream | None = None  # warm-up and capture run here

    def usable(self, engine) -> bool:
        if self.reason is None:
            self.reason = self._why_not(engine) or ""
            if self.reason:
                logger.info("training steps run eagerly: %s", self.reason)
        return not self.reason

    def _why_not(self, engine) -> str | None:
        if not self.enabled:
            return "cuda_graphs is off"
        if engine.state.device is None or torch.device(engine.state.device).type != "cuda":
            return "CUDA graphs need a CUDA device"
        if getattr(getattr(engine.data_loader, "cache", None), "storage", None) == "memmap":
            # its read-ahead thread copies batches to the GPU while the main thread would capture the step
            return (
                "the image cache is memory-mapped (cache_storage), and its read-ahead thread would copy during capture"
            )
        if getattr(engine, "compile", False):
            return "the network is compiled (torch.compile makes its own graphs)"
        if engine.accumulation_steps > 1:
            return "gradients are accumulated over several steps"
        if isinstance(engine.network, torch.nn.parallel.DistributedDataParallel):
            return "DistributedDataParallel synchronises gradients outside the graph"
        if engine.amp and engine.amp_kwargs.get("dtype", torch.float16) != torch.bfloat16:
            return "float16 autocast needs a loss scaler, whose overflow check cannot run in a graph"
        if not all(group.get("fused") or group.get("capturable") for group in engine.optimizer.param_groups):
            return "the optimizer keeps its step count on the host (use fused=True or capturable=True)"
        return None

    def __call__(self, engine, batchdata: dict) -> list[dict]:
        if not self.usable(engine):
            return trainer_iteration(engine, batchdata)
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        key = (tuple(inputs.shape), inputs.dtype, inputs.stride(), tuple(targets.shape), targets.dtype)
        graph = self.graphs.get(key)
        if graph is None:
            if self.eager_steps.get(key, 0) < self.warmup_steps or len(self.graphs) >= self.max_graphs:
                self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
                return self._eager_on_side_stream(engine, batchdata)
            graph = self.graphs[key] = self._capture(engine, inputs, targets)
        graph["inputs"].copy_(inputs)
        graph["targets"].copy_(targets)
        engine.network.train()
        graph["graph"].replay()
        engine.state.output = {
            Keys.IMAGE: inputs,
            Keys.LABEL: targets,
            Keys.PRED: graph["pred"],
            Keys.LOSS: graph["loss"],
        }
        for event in (
            IterationEvents.FORWARD_COMPLETED,
            IterationEvents.LOSS_COMPLETED,
            IterationEvents.BACKWARD_COMPLETED,
            IterationEvents.MODEL_COMPLETED,
        ):
            engine.fire_event(event)
        return [engine.state.output]

    def _eager_on_side_stream(self, engine, batchdata: dict) -> list[dict]:
        # capture needs every lazy initialisation (cuBLAS handles, cuDNN plans, the autograd engine's
        # streams, the optimizer's state) done beforehand, on a stream other than the default one
        side = self._side_stream(engine)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = trainer_iteration(engine, batchdata)
        torch.cuda.current_stream().wait_stream(side)
        return output

    def _side_stream(self, engine) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=engine.state.device)
        return self._stream

    def _capture(self, engine, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        optimizer = engine.optimizer
        if not any(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups):
            # checkpoints keep a plain number, so that they resume anywhere (a CPU's AdamW refuses a tensor)
            optimizer.register_state_dict_post_hook(_plain_learning_rates)
        for group in optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):  # a tensor the scheduler fills in place, read by each replay
                group["lr"] = torch.tensor(float(group["lr"]), device=inputs.device)
            group["capturable"] = True
        static = {"inputs": inputs.clone(), "targets": targets.clone(), "graph": torch.cuda.CUDAGraph()}
        engine.network.train()
        optimizer.zero_grad(set_to_none=True)  # backward then writes gradients into the graph's own memory
        torch.cuda.synchronize(inputs.device)
        # the autocast weight cache lives outside the graph's memory: off while capturing
        amp = torch.autocast("cuda", **{**engine.amp_kwargs, "cache_enabled": False}, enabled=bool(engine.amp))
        with torch.cuda.graph(static["graph"], stream=self._side_stream(engine)):
            with amp:
                static["pred"] = engine.inferer(static["inputs"], engine.network)
                static["loss"] = engine.loss_function(static["pred"], static["targets"]).mean()
            static["loss"].backward()
            optimizer.step()
        # the warm-up steps' memory, cached by the allocator, is not needed again: the graph has its own pool
        torch.cuda.empty_cache()
        logger.info("training step captured as a CUDA graph for batches of shape %s", list(inputs.shape))
        return static


def _plain_learning_rates(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        group["capturable"] = False
    return state


class FirstStepTimer:
    """Logs when the first training step has finished on the device, in seconds since the process
    started: the cold start a user waits through (imports, config, data checks, cache, cuDNN tuning,
    graph capture). One wait for the device, once per run."""

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self._log)

    def _log(self, engine) -> None:
        device = engine.state.device
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        now = time.time()
        logger.info(
            "first training step done %.2f s after the process started (unix time %.3f)",
            now - process_start_time(),
            now,
        )


def process_start_time() -> float:
    """When this process started, as a Unix time (Linux's /proc; else the first call's time)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _FIRST_CALL


_FIRST_CALL = time.time()


class ValidationOutputd:
    """Validation's postprocessing, in plain torch, of a whole batch (train.json's evaluator does not
    decollate) or of one image: the logits (as float32, kept under ``logits`` for the calibration fit),
    the calibrated probabilities under ``pred`` and the label one-hot.

    What MONAI's EnsureTyped + CastToTyped + CopyItemsd + AsDiscreted(to_onehot) chain gives per image, at a
    small share of its cost: that chain took ~0.3 s of CPU per validation epoch of 1,206 images, a tenth
    of a GPU epoch. ``PredictionsToCPU`` has already moved the batch to the CPU.
    """

    def __init__(self, calibration, num_classes: int) -> None:
        self.calibration = calibration
        self.num_classes = int(num_classes)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        logits = torch.as_tensor(d["pred"]).detach().cpu().float()
        d["logits"] = logits
        d["pred"] = self.calibration.probabilities(logits)
        if d.get("label") is not None:
            label = torch.as_tensor(d["label"]).detach().cpu().long().reshape(logits.shape[:-1])
            d["label"] = torch.nn.functional.one_hot(label, self.num_classes).float()
        return d
