"""Class-imbalance handling, selected by the config key ``imbalance``.

HAM10000 is ~67% nevi and ~1% dermatofibroma: without a correction the network learns to say
"nv". Two standard corrections are offered; both are derived from the training split's labels.

- ``"loss"``: cross-entropy weighted by inverse class frequency (``n / (k * n_c)``).
- ``"sampler"``: draw training images with probability inversely proportional to their class
  frequency, so each epoch sees the classes about equally often.
- ``"none"``: neither.
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


def loss_weights(strategy: str, counts: Sequence[int]) -> torch.Tensor | None:
    """Per-class cross-entropy weights for ``strategy == "loss"``, else None.

    Classes absent from training get weight 0: they contribute no loss term anyway.
    """
    _check(strategy)
    if strategy != "loss":
        return None
    total, present = sum(counts), sum(1 for c in counts if c)
    return torch.tensor([total / (present * c) if c else 0.0 for c in counts], dtype=torch.float32)


def sampler(strategy: str, items: Sequence[dict], seed: int = 0) -> WeightedRandomSampler | None:
    """A class-balancing sampler over ``items`` for ``strategy == "sampler"``, else None.

    Draws ``len(items)`` samples with replacement per epoch, so an epoch keeps its usual length.
    """
    _check(strategy)
    if strategy != "sampler":
        return None
    labels = [int(item["label"]) for item in items]
    counts = class_counts(items, max(labels) + 1)
    weights = [1.0 / counts[label] for label in labels]
    return WeightedRandomSampler(weights, num_samples=len(items), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))
