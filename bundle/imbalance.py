"""Class-imbalance handling, selected by the config key ``imbalance``.

HAM10000 is ~67% nevi and ~1% dermatofibroma: without a correction the network learns to say
"nv". Two standard corrections are offered; both are derived from the training split's labels.

- ``"loss"``: cross-entropy weighted by inverse class frequency (``n / (k * n_c)``).
- ``"sampler"``: draw training images with probability inversely proportional to their class
  frequency, so each epoch sees the classes about equally often.
- ``"logit_adjusted"``: logit-adjusted cross-entropy (Menon et al. 2021, ``LogitAdjustedLoss``): the
  training loss sees the logits plus ``tau * log(prior)``, so the network's own logits learn the
  class-balanced posterior; ``tau = 1`` is the balanced softmax (Ren et al. 2020). Plain sampling.
- ``"none"``: neither.

With ``"sampler"``, ``deferred_epochs`` (Cao et al. 2019's deferred re-sampling) samples plainly first and
class-balanced only for the last ``deferred_epochs`` epochs (``DeferredSampler``).

``power`` softens the loss weights and the sampler: each class is weighted by ``(1 / n_c) ** power``, so 1 balances
fully and 0.5 (square-root balancing) meets the data half way. Full balancing makes the rare classes'
few images dominate (on HAM10000 a dermatofibroma image is drawn ~58 times as often as a nevus) and
overfits them; the decision rule fitted on validation (``bundle.calibration``) corrects what a
partial balance leaves.
"""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler, WeightedRandomSampler

STRATEGIES = ("loss", "sampler", "logit_adjusted", "none")


def _check(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"config key 'imbalance' must be one of {STRATEGIES}, got {strategy!r}")


def class_counts(items: Sequence[dict], num_classes: int) -> list[int]:
    """Number of items of each class (``item["label"]``), in class-index order."""
    counts = [0] * num_classes
    for item in items:
        counts[int(item["label"])] += 1
    return counts


def _check_power(power: float) -> float:
    if not 0.0 <= float(power) <= 1.0:
        raise ValueError(f"config key 'imbalance_power' must be in [0, 1], got {power}")
    return float(power)


def loss_weights(strategy: str, counts: Sequence[int], power: float = 1.0) -> torch.Tensor | None:
    """Per-class cross-entropy weights ``(1 / n_c) ** power`` for ``strategy == "loss"``, else None.

    Scaled so that the average weight per training image is 1 (the loss keeps its size). Classes
    absent from training get weight 0: they contribute no loss term anyway.
    """
    _check(strategy)
    power = _check_power(power)
    if strategy != "loss":
        return None
    raw = [c**-power if c else 0.0 for c in counts]
    per_image = sum(w * c for w, c in zip(raw, counts, strict=True)) / sum(counts)
    return torch.tensor([w / per_image for w in raw], dtype=torch.float32)


class LogitAdjustedLoss(torch.nn.Module):
    """Cross-entropy on ``logits + tau * log(prior)``, the prior being the training split's class frequencies.

    Only the loss sees the shifted logits: the network's raw logits (validated, calibrated and served)
    are pushed to carry the class-balanced posterior instead of the skewed training one (Menon et al.
    2021). ``tau = 1`` is the balanced softmax (Ren et al. 2020). Targets are class indices ``(N,)`` or
    probabilities ``(N, C)`` (mixup / CutMix), as torch's cross-entropy takes them, with its
    ``label_smoothing`` and optional class ``weight``.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        tau: float = 1.0,
        label_smoothing: float = 0.0,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if float(tau) < 0:
            raise ValueError(f"config key 'logit_adjust_tau' must be 0 or more, got {tau}")
        if not sum(class_counts):
            raise ValueError("LogitAdjustedLoss needs training labels (all class counts are 0)")
        # an absent class counts as one image: log(0) would make its shifted logit -inf (and the loss inf)
        counts = torch.tensor([max(int(c), 1) for c in class_counts], dtype=torch.float32)
        self.register_buffer("adjustment", float(tau) * torch.log(counts / counts.sum()))
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            logits.float() + self.adjustment, target, weight=self.weight, label_smoothing=self.label_smoothing
        )


def cross_entropy(
    strategy: str,
    class_counts: Sequence[int],
    power: float = 1.0,
    label_smoothing: float = 0.0,
    logit_adjust_tau: float = 1.0,
) -> torch.nn.Module:
    """train.json's loss: ``LogitAdjustedLoss`` for ``"logit_adjusted"``, else torch's cross-entropy,
    class-weighted for ``"loss"`` (``loss_weights``)."""
    if strategy == "logit_adjusted":
        return LogitAdjustedLoss(class_counts, logit_adjust_tau, label_smoothing)
    return torch.nn.CrossEntropyLoss(
        weight=loss_weights(strategy, class_counts, power), label_smoothing=float(label_smoothing)
    )


class DeferredSampler(Sampler[int]):
    """Plain sampling, then class-balanced after ``switch_epoch`` (Cao et al. 2019's deferred re-sampling).

    Each epoch draws ``len(weights)`` indices: a random permutation up to ``switch_epoch``, then with
    replacement in proportion to ``weights``. Both give the same count, so a loader cuts every epoch
    into the same number of equal batches across the switch.

    The epoch is the trainer's when ``follow(engine)`` was called (``follow_epochs``, first in train.json's
    ``run``): a run resumed from a checkpoint then switches at the right epoch. Otherwise it counts its
    own passes (``set_epoch`` sets the next one), which restarts at 1 on a resume: code that runs the
    trainer itself, not train.json's ``run``, should call ``follow_epochs`` to resume correctly.
    """

    def __init__(self, weights: Sequence[float], switch_epoch: int, seed: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.switch_epoch = int(switch_epoch)
        self.generator = torch.Generator().manual_seed(seed)
        self.engine = None
        self._next_epoch = 1

    def follow(self, engine) -> None:
        """Take the epoch from ``engine.state.epoch`` (ignite counts it from 1 before fetching its data)."""
        self.engine = engine

    def set_epoch(self, epoch: int) -> None:
        """The epoch (from 1) that the next pass draws for, when not following an engine."""
        self._next_epoch = int(epoch)

    def balanced(self, epoch: int) -> bool:
        return epoch > self.switch_epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        if self.engine is not None:
            epoch = self.engine.state.epoch
        else:
            epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        if self.balanced(epoch):
            draws = torch.multinomial(self.weights, len(self), replacement=True, generator=self.generator)
        else:
            draws = torch.randperm(len(self), generator=self.generator)
        return iter(draws.tolist())


def follow_epochs(sampler, engine) -> None:
    """Let a ``DeferredSampler`` read the trainer's epoch (a no-op for any other sampler or None)."""
    if isinstance(sampler, DeferredSampler):
        sampler.follow(engine)


def sampler(
    strategy: str,
    items: Sequence[dict],
    seed: int = 0,
    power: float = 1.0,
    deferred_epochs: int = 0,
    max_epochs: int | None = None,
) -> WeightedRandomSampler | DeferredSampler | None:
    """A class-balancing sampler over ``items`` for ``strategy == "sampler"``, else None.

    Each image is drawn with probability proportional to ``(1 / n_its_class) ** power``, so a class
    is drawn in proportion to ``n_c ** (1 - power)``. Draws ``len(items)`` samples with replacement
    per epoch, so an epoch keeps its usual length. With ``deferred_epochs`` > 0, a ``DeferredSampler``
    that is balanced only for the last ``deferred_epochs`` of ``max_epochs``.
    """
    _check(strategy)
    power = _check_power(power)
    deferred_epochs = int(deferred_epochs)
    if deferred_epochs < 0:
        raise ValueError(f"config key 'deferred_epochs' must be 0 (off) or more, got {deferred_epochs}")
    if deferred_epochs and strategy != "sampler":
        raise ValueError(
            "config key 'deferred_epochs' defers the class-balanced sampler: "
            f"it needs imbalance 'sampler', not {strategy!r}"
        )
    if strategy != "sampler":
        return None
    labels = [int(item["label"]) for item in items]
    counts = class_counts(items, max(labels) + 1)
    weights = [counts[label] ** -power for label in labels]
    if deferred_epochs:
        if max_epochs is None:
            raise ValueError("config key 'deferred_epochs' needs max_epochs")
        return DeferredSampler(weights, switch_epoch=int(max_epochs) - deferred_epochs, seed=seed)
    return WeightedRandomSampler(
        weights, num_samples=len(items), replacement=True, generator=torch.Generator().manual_seed(seed)
    )
