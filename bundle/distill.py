"""Distillation (issue 17): one DenseNet121 student trained on the averaged soft labels of several teachers,
so that the served model stays one network.

``scripts/soft_labels.py`` runs every teacher over the training split through the serving path and writes,
with ``write_soft_labels``, the mean over teachers of ``softmax(logits / T)``: one row per image, keyed by the
image's path relative to the dataset folder (``image_key``), so the file fits wherever the dataset is mounted.

train.json reads that file when ``distill_soft_labels`` names it (``Distillation``). Each training image's
target becomes ``(1 - distill_weight) * onehot(label) + distill_weight * teachers' probabilities``, a float
``(num_classes,)`` row that the loader hands to the loss in place of the class index. Mixup and CutMix mix
those rows; the class-balanced sampler and the class weights of the loss still read the hard labels.
A file written for another training split or another class list is refused before any work, naming it.
Validation, calibration, evaluation and serving are unchanged.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from bundle.atomic import atomic_write
from bundle.labels import CLASS_NAMES

SOFT_LABELS_FORMAT = 1  # bump when the file's layout changes
SUM_TOLERANCE = 1e-3  # each row is a probability distribution, up to float error


def image_key(path: str | os.PathLike, dataset_dir: str | os.PathLike) -> str:
    """How a soft-label file names an image: its path relative to the dataset folder, as the datalist holds it."""
    return Path(os.path.relpath(path, dataset_dir)).as_posix()


def write_soft_labels(
    path: str | os.PathLike,
    images: Sequence[str],
    probabilities: torch.Tensor,
    temperature: float,
    teachers: Sequence[str | os.PathLike],
    datalist: str | os.PathLike,
) -> None:
    """Save one probability row per image (``images``: ``image_key``s), atomically, with what produced them."""
    record = {
        "format": SOFT_LABELS_FORMAT,
        "class_names": list(CLASS_NAMES),
        "images": list(images),
        "probabilities": probabilities.detach().float().cpu(),
        "temperature": float(temperature),
        "teachers": [str(teacher) for teacher in teachers],
        "datalist": str(datalist),
    }
    atomic_write(path, lambda tmp: torch.save(record, tmp))


def probability_rows(probabilities: torch.Tensor) -> bool:
    """Every row finite, non-negative and summing to 1 (NaN passes a plain comparison, hence ``isfinite``)."""
    if not len(probabilities):
        return True
    return bool(
        torch.isfinite(probabilities).all()
        and (probabilities >= 0).all()
        and (probabilities.sum(1) - 1).abs().max() <= SUM_TOLERANCE
    )


def check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= float(weight) <= 1.0:
        raise ValueError(
            f"config key 'distill_weight' (the teachers' share of each training target) must be a number in "
            f"[0, 1], got {weight!r}"
        )
    return float(weight)


class Distillation:
    """The soft labels in ``path``, checked against the training split, blended with the one-hot labels.

    Args:
        path: a file ``scripts/soft_labels.py`` wrote.
        weight: the teachers' share of each target (``distill_weight``).
        split_items: the whole training split (every rank's shard together, under DDP): the file must hold
            exactly its images.
        dataset_dir: the folder the items' image paths are under.
        class_names: the student's classes, in output order.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        weight: float,
        split_items: Sequence[dict],
        dataset_dir: str | os.PathLike,
        class_names: Sequence[str],
    ) -> None:
        self.path = Path(path)
        self.weight = check_weight(weight)
        self.dataset_dir = dataset_dir
        record = self._read(list(class_names))
        self.images: list[str] = record["images"]
        self.probabilities: torch.Tensor = record["probabilities"]
        self.written_for = str(record.get("datalist"))
        self.rows = {image: row for row, image in enumerate(self.images)}
        self._check_split([image_key(item["image"], dataset_dir) for item in split_items])

    @classmethod
    def from_config(
        cls,
        soft_labels: str | os.PathLike | None,
        weight: float,
        split_items: Sequence[dict],
        dataset_dir: str | os.PathLike,
        class_names: Sequence[str],
    ) -> Distillation | None:
        """train.json's ``distillation``: None when ``distill_soft_labels`` is null (off); ``distill_weight``
        is checked either way, so a bad value never waits for the day distillation is turned on."""
        weight = check_weight(weight)
        return None if soft_labels is None else cls(soft_labels, weight, split_items, dataset_dir, class_names)

    def _read(self, class_names: list[str]) -> dict:
        where = f"config key 'distill_soft_labels': {self.path}"
        if not self.path.is_file():
            raise ValueError(f"{where} does not exist; write it with scripts/soft_labels.py")
        try:
            record = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for a file that is not a checkpoint
            raise ValueError(f"{where} is not a soft-label file ({type(error).__name__}: {error})") from None
        if not isinstance(record, dict) or record.get("format") != SOFT_LABELS_FORMAT:
            raise ValueError(
                f"{where} is not a soft-label file of format {SOFT_LABELS_FORMAT}; write it with scripts/soft_labels.py"
            )
        missing = [key for key in ("class_names", "images", "probabilities") if key not in record]
        if missing or not isinstance(record["probabilities"], torch.Tensor):
            raise ValueError(
                f"{where} is damaged: "
                + (f"it has no {missing}" if missing else "its 'probabilities' are not a tensor")
                + "; write it again with scripts/soft_labels.py"
            )
        if list(record["class_names"]) != class_names:
            raise ValueError(
                f"{where} holds probabilities of the classes {record['class_names']}, but the student classifies "
                f"into {class_names}: its teachers must share the student's class list"
            )
        probabilities, images = record["probabilities"], record["images"]
        if probabilities.shape != (len(images), len(class_names)) or len(set(images)) != len(images):
            raise ValueError(
                f"{where} is damaged: {len(images)} image names ({len(set(images))} distinct) for probabilities "
                f"of shape {list(probabilities.shape)}"
            )
        if not probability_rows(probabilities):
            raise ValueError(f"{where} is damaged: its rows are not probability distributions (or not finite)")
        return record

    def _check_split(self, split: list[str]) -> None:
        """The file must hold exactly the training split: soft labels of another split are another run's."""
        missing = sorted(set(split) - self.rows.keys())
        extra = sorted(self.rows.keys() - set(split))
        if missing or extra:
            examples = "; ".join(
                f"e.g. {names[0]!r} {what}" for names, what in ((missing, "has none"), (extra, "is not in it")) if names
            )
            raise ValueError(
                f"config key 'distill_soft_labels': {self.path} was written for another training split (its "
                f"datalist: {self.written_for}): {len(missing)} of this run's {len(split)} "
                f"training images have no soft label and {len(extra)} of its {len(self.rows)} images are not in "
                f"this run's training split ({examples}). Write the soft labels for this run's datalist with "
                "scripts/soft_labels.py"
            )

    def targets(self, items: Sequence[dict]) -> torch.Tensor:
        """Each item's training target, in order: a float ``(len(items), num_classes)`` tensor of
        ``(1 - weight) * onehot(label) + weight * teachers' probabilities``."""
        rows = torch.tensor([self.rows[image_key(item["image"], self.dataset_dir)] for item in items])
        labels = torch.tensor([int(item["label"]) for item in items])
        one_hot = torch.nn.functional.one_hot(labels, self.probabilities.shape[1]).float()
        return (1.0 - self.weight) * one_hot + self.weight * self.probabilities[rows]

    @property
    def fingerprint(self) -> str:
        """sha256 of what the targets are made of: the images, their soft labels and the weight."""
        digest = hashlib.sha256(repr((self.images, self.weight)).encode())
        digest.update(self.probabilities.contiguous().numpy().tobytes())
        return "sha256:" + digest.hexdigest()


def resume_record(distillation: Distillation | None) -> dict:
    """What train.json's ``trained_on`` adds for distillation: the targets' fingerprint, so that a student never
    resumes a teacher's run, and None when off, so that a plain run never resumes a student's (a checkpoint
    written before this key, which records no distillation either, reads as None and resumes as before)."""
    return {"distillation": None if distillation is None else distillation.fingerprint}


def labelled_items(items: Sequence[dict], targets: torch.Tensor | None) -> list[dict]:
    """``items`` with each ``label`` replaced by its target row (None: unchanged), for the per-sample chain
    (configs/train_chain.json), whose loader collates the rows into ``(N, num_classes)`` batches."""
    if targets is None:
        return list(items)
    return [{**item, "label": target} for item, target in zip(items, targets, strict=True)]
