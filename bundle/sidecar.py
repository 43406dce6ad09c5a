"""The weights' sidecar: what a ``state_dict`` cannot hold, kept beside it as JSON.

``models/model.json`` beside ``models/model.pt`` (``models/model.ts`` exported from it shares it).
Training writes it whenever it saves a better model (``bundle.handlers.BestModelSaver``):

- ``image_size``: the [height, width] the weights were trained at. DenseNet runs at any size, so a
  model served at another size mispredicts without an error; serving resizes to this size and batch
  inference and evaluation refuse another;
- ``class_names``, ``epoch``, ``metric``: what the weights are and when they were saved;
- ``calibration``: the temperature and the decision rule fitted on the validation split
  (``bundle.calibration``), so that evaluation, batch inference and every server give the same
  calibrated probabilities and the same class.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

from bundle.atomic import atomic_write


def sidecar_path(weights: str | os.PathLike) -> Path:
    """``weights`` with the suffix ``.json``: ``models/model.ts`` shares ``models/model.pt``'s sidecar."""
    return Path(weights).with_suffix(".json")


def read_sidecar(weights: str | os.PathLike) -> dict | None:
    """The sidecar of ``weights`` as a dict (always with an ``image_size``); None for weights saved without one."""
    sidecar = sidecar_path(weights)
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except ValueError as error:
        record, problem = None, f": {error}"
    else:
        problem = ""
    if not isinstance(record, dict) or "image_size" not in record:
        raise ValueError(f"{sidecar} (the sidecar of {weights}) is not a JSON object with an 'image_size'{problem}")
    return record


def write_sidecar(weights: str | os.PathLike, record: dict) -> None:
    atomic_write(sidecar_path(weights), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def trained_image_size(weights: str | os.PathLike) -> list[int] | None:
    """The [height, width] ``weights`` were trained at, from their sidecar; None for a model saved without one."""
    record = read_sidecar(weights)
    if record is None:
        return None
    size = record["image_size"]
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)):
        raise ValueError(f"{sidecar_path(weights)} (the sidecar of {weights}): 'image_size' must be [height, width] "
                         f"in pixels, got {size!r}")
    return size


def check_trained_image_size(ckpt_path: str | os.PathLike, image_size: Sequence[int]) -> None:
    """Fail before any work when ``ckpt_path`` was trained at another size: the network would run and mispredict."""
    trained, configured = trained_image_size(ckpt_path), [int(side) for side in image_size]
    if trained is not None and trained != configured:
        height, width = trained
        raise ValueError(f"ckpt_path {ckpt_path} was trained at image_size {trained} (says {sidecar_path(ckpt_path)}), "
                         f"but this run's image_size is {configured}: pass --image_size \"[{height},{width}]\"")
