"""Write the teachers' averaged soft labels of a datalist's training split, for a distilled student.

    python scripts/soft_labels.py --teachers "['W/teacher_s0/models/model.pt','W/teacher_s1/models/model.pt']" \
        --dataset_dir D --datalist W/datalist.json --output W/soft_labels.pt \
        [--temperature 1.0] [--bundle_root .] [--batch_size 64] [--device cuda:0]

Each teacher classifies every training image through the serving path, ``bundle.predictor.Predictor``: the
preprocessing and the test-time augmentation of the bundle's ``configs/inference.json``, at the image size the
teacher was trained at, its sidecar checked. The file (``bundle.distill.write_soft_labels``) holds per image the
mean over the teachers of ``softmax(logits / temperature)``; train.json reads it with ``--distill_soft_labels``.

Refused before any work, naming the file: a teacher that is missing or does not load, a teacher whose classes
are not the student's, and a teacher whose resume checkpoint (``checkpoint_last.pt`` beside its weights) says it
was trained on another datalist, since its training images may then be the student's validation or test images.
A teacher whose probabilities are not finite (diverged weights) is refused once it has run, before anything is
written. An image the split lists twice gets one row.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import fire
import torch
from tqdm import tqdm

from bundle import data, distill
from bundle.labels import CLASS_NAMES
from bundle.predictor import Predictor
from bundle.sidecar import read_sidecar

logger = logging.getLogger("soft_labels")


def teacher_paths(teachers: str | Sequence[str]) -> list[Path]:
    """``--teachers`` as a list of weights files: fire gives a list for ``"['a.pt','b.pt']"`` and a string for
    ``a.pt,b.pt`` or ``[a.pt, b.pt]``."""
    if isinstance(teachers, str):
        teachers = teachers.strip().strip("[]").split(",")
    paths = [Path(str(teacher).strip().strip("'\"")) for teacher in teachers if str(teacher).strip()]
    if not paths:
        raise ValueError("--teachers names no weights")
    return paths


def check_teacher(teacher: Path, datalist: str) -> None:
    """The teacher's weights exist, it classifies into the student's classes and, as far as its resume checkpoint
    tells, it was trained on ``datalist``."""
    if not teacher.is_file():
        raise ValueError(f"teacher {teacher} does not exist (--teachers names weights files: W/run/models/model.pt)")
    names = (read_sidecar(teacher) or {}).get("class_names")
    if names is not None and list(names) != list(CLASS_NAMES):
        raise ValueError(
            f"teacher {teacher} classifies into {len(names)} classes {list(names)} (its sidecar says so), but "
            f"the student into {len(CLASS_NAMES)}: {list(CLASS_NAMES)}; every teacher must share the student's "
            "class list"
        )
    checkpoint = teacher.with_name("checkpoint_last.pt")
    trained_on = (
        torch.load(checkpoint, map_location="cpu", weights_only=True).get("trained_on") or {}
        if checkpoint.is_file()
        else {}
    )
    if "datalist" not in trained_on:
        logger.warning(
            "cannot check that teacher %s was trained on %s: no %s records it", teacher, datalist, checkpoint
        )
    elif trained_on["datalist"] != data.datalist_fingerprint(datalist):
        raise ValueError(
            f"teacher {teacher} was trained on another datalist than {datalist} (says {checkpoint}): its training "
            "images may be the student's validation or test images, which distillation would leak into the "
            f"student. Train the teachers on {datalist}"
        )


def teacher_probabilities(
    predictor: Predictor, items: list[dict], temperature: float, batch_size: int, bar: tqdm
) -> torch.Tensor:
    """``softmax(logits / temperature)`` of every item's image, by the predictor's own preprocessing and inferer."""
    rows = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        logits, _features = predictor.forward(torch.stack([_preprocessed(predictor, item["image"]) for item in batch]))
        rows.append(torch.softmax(logits / temperature, dim=1))
        bar.update(len(batch))
    probabilities = torch.cat(rows)
    if not distill.probability_rows(probabilities):
        raise ValueError(
            f"teacher {predictor.weights} gave non-finite probabilities for some training images (diverged "
            "weights?); nothing was written"
        )
    return probabilities


def _preprocessed(predictor: Predictor, path: str) -> torch.Tensor:
    try:
        return predictor.preprocess(Path(path).read_bytes())
    except Exception as error:  # the served path refuses the image: say which one
        raise ValueError(f"{path}: {error}") from error


def main(
    teachers: str | list[str],
    dataset_dir: str,
    datalist: str,
    output: str,
    temperature: float = 1.0,
    bundle_root: str = ".",
    batch_size: int = 64,
    device: str | None = None,
) -> None:
    """Write ``output``: the ``teachers``' averaged tempered probabilities of every image of ``datalist``'s
    training split (images under ``dataset_dir``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = teacher_paths(teachers)
    if not float(temperature) > 0:
        raise ValueError(f"--temperature must be above 0, got {temperature}")
    items = data.load_datalist(datalist, "training", dataset_dir)
    data.preflight(datalist, dataset_dir, keys=["training"])
    for teacher in paths:
        check_teacher(teacher, datalist)
    predictors = [Predictor(bundle_root, weights=teacher, device=device) for teacher in paths]
    # an image the split lists twice gets one row: the file names each image once
    unique = {distill.image_key(item["image"], dataset_dir): item for item in items}
    items = list(unique.values())
    total = torch.zeros(len(items), len(CLASS_NAMES))
    with tqdm(total=len(items) * len(paths), desc=f"{len(paths)} teachers' soft labels", unit="img") as bar:
        for predictor in predictors:
            total += teacher_probabilities(predictor, items, float(temperature), int(batch_size), bar)
    distill.write_soft_labels(output, list(unique), total / len(paths), float(temperature), paths, datalist)
    print(f"wrote {output}: {len(items)} training images, {len(paths)} teacher(s), temperature {temperature}")


if __name__ == "__main__":
    fire.Fire(main)
