"""The weights' sidecar: what a ``state_dict`` cannot hold, kept beside it as JSON.

``models/model.json`` beside ``models/model.pt`` (``models/model.ts`` exported from it shares it).
Training writes it whenever it saves a better model (``bundle.handlers.BestModelSaver``):

- ``image_size``: the [height, width] the weights were trained at. DenseNet runs at any size, so a
  model served at another size mispredicts without an error; serving resizes to this size and batch
  inference and evaluation refuse another;
- ``class_names``: the class of each output channel, in order; loaders refuse any order but
  ``bundle.labels.CLASS_NAMES``, the one every server answers in;
- ``weights_fingerprint``: a hash of the tensors of the weights this sidecar belongs to (names,
  dtypes, shapes and values, so a TorchScript export of the same weights has the same one). Loaders
  compare it with the weights they load: a sidecar left from other weights is refused, never applied;
- ``epoch``, ``metric``: when the weights were saved and their validation score;
- ``calibration``: the temperature, the decision rule and the triage refer threshold fitted on the
  validation split (``bundle.calibration``), so that evaluation, batch inference and every server give
  the same calibrated probabilities, the same class and the same refer answer.

Weights and sidecar are two files, so they cannot be replaced in one step. ``save_pair`` writes the
new sidecar under a pending name first, then replaces the weights, then renames the sidecar into
place: a kill at any point leaves either the old pair, or new weights whose sidecar is still pending
(refused by every loader through the fingerprint, and completed by ``complete_interrupted_save``,
which training runs when it starts again).

Loaders (``verified_sidecar``, ``check_weights``) refuse weights without a sidecar, or with one that
records no fingerprint (written before sidecars did), unless the caller opts in with
``allow_missing_sidecar``: such weights are then used at the configured image size, uncalibrated.
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from bundle.atomic import atomic_write
from bundle.flags import as_bool
from bundle.labels import CLASS_NAMES

logger = logging.getLogger(__name__)

FINGERPRINT = "weights_fingerprint"
OPT_IN = "allow_missing_sidecar (config key: --allow_missing_sidecar true; Predictor(..., allow_missing_sidecar=True))"


class SidecarError(ValueError):
    """Weights and their sidecar cannot be served together; the message names the files and what to do."""


def sidecar_path(weights: str | os.PathLike) -> Path:
    """``weights`` with the suffix ``.json``: ``models/model.ts`` shares ``models/model.pt``'s sidecar."""
    return Path(weights).with_suffix(".json")


def pending_path(weights: str | os.PathLike) -> Path:
    """Where ``save_pair`` keeps the new sidecar until the new weights are in place."""
    sidecar = sidecar_path(weights)
    return sidecar.with_name(sidecar.name + ".pending")


def read_sidecar(weights: str | os.PathLike) -> dict | None:
    """The sidecar of ``weights`` as a dict (always with an ``image_size``); None for weights saved without one.

    Only reads it: ``verified_sidecar`` also checks that it belongs to the weights."""
    return _read_record(sidecar_path(weights), weights)


def _read_record(sidecar: Path, weights: str | os.PathLike) -> dict | None:
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


def load_weights(weights: str | os.PathLike) -> dict[str, torch.Tensor] | torch.nn.Module:
    """The weights as the loaders read them, on the CPU: a state_dict, or a TorchScript module for ``.ts``."""
    weights = Path(weights)
    try:
        if weights.suffix == ".ts":
            return torch.jit.load(str(weights), map_location="cpu")
        return torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise SidecarError(f"cannot load weights {weights}: {type(error).__name__}: {error}") from None


def weights_fingerprint(weights: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: the same for a state_dict and its TorchScript export."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def new_record(weights: Mapping[str, torch.Tensor] | torch.nn.Module, image_size: Sequence[int]) -> dict:
    """A sidecar for ``weights`` trained at ``image_size``, in the serving class order."""
    return {
        "image_size": [int(side) for side in image_size],
        "class_names": list(CLASS_NAMES),
        FINGERPRINT: weights_fingerprint(weights),
    }


def save_pair(weights: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], record: dict) -> None:
    """Replace ``weights`` with ``state_dict`` and their sidecar with ``record`` so that no kill leaves a pair
    a loader accepts but that does not belong together (module docstring)."""
    record = {**record, FINGERPRINT: weights_fingerprint(state_dict)}
    pending = pending_path(weights)
    atomic_write(pending, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    atomic_write(weights, lambda tmp: torch.save(dict(state_dict), tmp))
    os.replace(pending, sidecar_path(weights))


def complete_interrupted_save(weights: str | os.PathLike) -> None:
    """After a kill inside ``save_pair``: put the pending sidecar in place if the weights it belongs to made it,
    else drop it (the old pair is intact)."""
    pending = pending_path(weights)
    if not pending.is_file():
        return
    try:
        record = _read_record(pending, weights)
        belongs = Path(weights).is_file() and record.get(FINGERPRINT) == weights_fingerprint(load_weights(weights))
    except ValueError:
        belongs = False
    if belongs:
        os.replace(pending, sidecar_path(weights))
        logger.warning("completed an interrupted save: %s now describes %s", sidecar_path(weights), weights)
    else:
        pending.unlink()
        logger.warning("dropped %s, left by a save interrupted before %s was replaced", pending, weights)


def trained_image_size(weights: str | os.PathLike) -> list[int] | None:
    """The [height, width] ``weights`` were trained at, from their sidecar; None for a model saved without one."""
    record = read_sidecar(weights)
    return None if record is None else _image_size(record, weights)


def _image_size(record: dict, weights: str | os.PathLike) -> list[int]:
    size = record["image_size"]
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)
    ):
        raise ValueError(
            f"{sidecar_path(weights)} (the sidecar of {weights}): 'image_size' must be [height, width] "
            f"in pixels, got {size!r}"
        )
    return size


def verified_sidecar(
    weights: str | os.PathLike,
    loaded: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    allow_missing_sidecar: bool = False,
) -> dict | None:
    """The sidecar of ``weights``, checked to belong to them (``loaded``: the weights already loaded, else read
    from ``weights``) and to list the classes in the serving order.

    Raises ``SidecarError`` naming the files for a sidecar of other weights or another class order, and, unless
    ``allow_missing_sidecar``, for weights without a sidecar or with one that records no fingerprint. With
    ``allow_missing_sidecar``, returns None for weights without one (used at the configured size, uncalibrated).
    """
    sidecar = sidecar_path(weights)
    record = read_sidecar(weights)
    interrupted = (
        (
            f"{pending_path(weights).name} is there: a save was interrupted; running the same training "
            "command again completes it"
        )
        if pending_path(weights).is_file()
        else ""
    )
    if record is None:
        if not allow_missing_sidecar:
            raise SidecarError(
                f"weights {weights} have no sidecar {sidecar}{f' ({interrupted})' if interrupted else ''}, "
                "so nothing says what image size they were "
                f"trained at, in which order their outputs name the classes, or how to calibrate them: refused. "
                f"For weights trained elsewhere, write one with configs/calibrate.json and --allow_missing_sidecar "
                f"true; to use them as they are (configured image size, uncalibrated), pass {OPT_IN}"
            )
        logger.warning(
            "weights %s have no sidecar %s: using them at the configured image size, uncalibrated, as "
            "allow_missing_sidecar asks; if they were trained at another size their predictions are wrong",
            weights,
            sidecar.name,
        )
        return None
    _image_size(record, weights)
    class_names = record.get("class_names")
    if class_names is not None and list(class_names) != list(CLASS_NAMES):
        raise SidecarError(
            f"{sidecar} (the sidecar of {weights}) says the outputs are the classes {class_names}, "
            f"but this bundle serves {list(CLASS_NAMES)} in that order: refused, as every answer "
            "would name the wrong class"
        )
    if FINGERPRINT not in record or class_names is None:
        missing = " and ".join(key for key in (FINGERPRINT, "class_names") if key not in record)
        if not allow_missing_sidecar:
            raise SidecarError(
                f"{sidecar} (the sidecar of {weights}) records no {missing}, so it cannot be matched to the weights "
                f"(written before sidecars recorded it): refused. Re-fit it with configs/calibrate.json and "
                f"--allow_missing_sidecar true, which records it, or pass {OPT_IN}"
            )
        logger.warning("%s records no %s: using it unverified, as allow_missing_sidecar asks", sidecar, missing)
        return record
    actual = weights_fingerprint(load_weights(weights) if loaded is None else loaded)
    if record[FINGERPRINT] != actual:
        raise SidecarError(
            f"{sidecar} belongs to other weights than {weights} (its {FINGERPRINT} is {record[FINGERPRINT]}, the "
            f"weights' is {actual}): {interrupted or 'one of the two was replaced without the other'}. Its image "
            f"size and calibration cannot be trusted for these weights: refused. Copy the weights and their sidecar "
            f"together"
        )
    return record


def check_weights(
    ckpt_path: str | os.PathLike, image_size: Sequence[int], allow_missing_sidecar: bool | str = False
) -> None:
    """Before any work: ``ckpt_path`` has its own sidecar (``verified_sidecar``) and was trained at ``image_size``."""
    allow = as_bool(allow_missing_sidecar, "allow_missing_sidecar")
    if verified_sidecar(ckpt_path, allow_missing_sidecar=allow) is not None:
        check_trained_image_size(ckpt_path, image_size)


def check_trained_image_size(ckpt_path: str | os.PathLike, image_size: Sequence[int]) -> None:
    """Fail before any work when ``ckpt_path`` was trained at another size: the network would run and mispredict."""
    trained, configured = trained_image_size(ckpt_path), [int(side) for side in image_size]
    if trained is not None and trained != configured:
        height, width = trained
        raise ValueError(
            f"ckpt_path {ckpt_path} was trained at image_size {trained} (says {sidecar_path(ckpt_path)}), "
            f'but this run\'s image_size is {configured}: pass --image_size "[{height},{width}]"'
        )
