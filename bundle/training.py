"""What every training run needs, whichever data path feeds it: seeding, the learning rate for the
batch size, and the trainer's iteration."""

import math

import torch
from monai.utils import set_determinism

LR_SCALING = ("linear", "sqrt", "none")


def seed_run(seed: int, cudnn_benchmark: bool) -> None:
    """MONAI's ``set_determinism``, then cuDNN autotuning back on if asked (it switches it off):
    autotuned convolutions are much faster on a GPU but not bit-reproducible."""
    set_determinism(seed=seed)
    if cudnn_benchmark:
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
