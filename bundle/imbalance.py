"""Class-imbalance handling, selected by the config key ``imbalance``.

HAM10000 is ~67% nevi and ~1% dermatofibroma: without a correction the network learns to say
"nv". Two standard corrections are offered; both are derived from the training split's labels.

- ``"loss"``: cross-entropy weighted by inverse class frequency (``n / (k * n_c)``).
- ``"sampler"``: draw training images with probability inversely proportional to their class
  frequency, so each epoch sees the classes about equally often.
- ``"none"``: neither.

``power`` softens either correction: each class is weighted by ``(1 / n_c) ** power``, so 1 balances
fully and 0.5 (square-root balancing) meets the data half way. Full balancing makes the rare classes'
few images dominate (on HAM10000 a dermatofibroma image is drawn ~58 times as often as a nevus) and
overfits them; the decision rule fitted on validation (``bundle.calibration``) corrects what a
partial balance leaves.
"""

from collections.abc import Sequence

import torch
from torch.utils.data import WeightedRandomSampler

STRATEGIES = ("loss", "sampler", "none")


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


def sampler(strategy: str, items: Sequence[dict], seed: int = 0, power: float = 1.0) -> WeightedRandomSampler | None:
    """A class-balancing sampler over ``items`` for ``strategy == "sampler"``, else None.

    Each image is drawn with probability proportional to ``(1 / n_its_class) ** power``, so a class
    is drawn in proportion to ``n_c ** (1 - power)``. Draws ``len(items)`` samples with replacement
    per epoch, so an epoch keeps its usual length.
    """
    _check(strategy)
    power = _check_power(power)
    if strategy != "sampler":
        return None
    labels = [int(item["label"]) for item in items]
    counts = class_counts(items, max(labels) + 1)
    weights = [counts[label] ** -power for label in labels]
    return WeightedRandomSampler(
        weights, num_samples=len(items), replacement=True, generator=torch.Generator().manual_seed(seed)
    )
