"""Ignite handlers the bundle's configs attach to the MONAI engines.

Each does one job that MONAI's stock handlers don't: keep the best model across a resume, keep a
per-epoch history on disk, and turn a finished evaluation or inference into files people use.
"""

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import from_engine
from monai.utils import evenly_divisible_all_gather, string_list_all_gather

from bundle.labels import CLASS_NAMES
from bundle.metrics import classification_report
from bundle.predictor import sidecar_path

logger = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)``, then move the result over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plain_state_dict(network: torch.nn.Module) -> dict:
    """The network's weights on the CPU, without a DistributedDataParallel/DataParallel wrapper."""
    module = getattr(network, "module", network)
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def as_bool(value: bool | str, key: str) -> bool:
    """A config flag that may arrive from the command line as text (``--resume false``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"config key {key!r} must be true or false, got {value!r}")


class BestModelSaver:
    """Saves the network's plain state_dict to ``save_path`` whenever the key metric improves.

    Attach it to the validation evaluator. Unlike MONAI's key-metric CheckpointSaver, the best score
    is in this handler's ``state_dict()``: put the handler in the resume checkpoint and a resumed run
    never replaces a better model with a worse one.

    Given the ``image_size`` [height, width] the network is trained at, it also writes the weights'
    sidecar (``bundle.predictor.sidecar_path``: ``model.json`` beside ``model.pt``) with that size, the
    class names, the epoch and the score, since a DenseNet served at another size runs and mispredicts.
    """

    def __init__(self, network: torch.nn.Module, save_path: str, metric_name: str, enabled: bool = True,
                 image_size: Sequence[int] | None = None) -> None:
        self.network = network
        self.save_path = save_path
        self.metric_name = metric_name
        self.enabled = enabled  # False on all but one rank under DDP: every rank tracks, one writes
        self.image_size = None if image_size is None else [int(side) for side in image_size]
        self.best_metric = -math.inf
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metric = float(engine.state.metrics[self.metric_name])
        if not math.isfinite(metric) or metric <= self.best_metric:
            return
        self.best_metric, self.best_epoch = metric, engine.state.epoch
        if not self.enabled:
            return
        sidecar = sidecar_path(self.save_path)
        sidecar.unlink(missing_ok=True)  # killed between the two writes, new weights must not keep an old run's size
        atomic_write(self.save_path, lambda tmp: torch.save(plain_state_dict(self.network), tmp))
        if self.image_size is not None:
            record = {"image_size": self.image_size, "class_names": list(CLASS_NAMES), "epoch": self.best_epoch,
                      "metric": {self.metric_name: self.best_metric}}
            atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        logger.info("epoch %d: %s improved to %.4f, saved %s", self.best_epoch, self.metric_name, metric, self.save_path)

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])


class ResumeCheckpoint:
    """Keeps ``path`` holding everything needed to resume training, rewritten after every epoch.

    At the trainer's start it restores the checkpoint if one exists (and ``resume``); after each
    epoch it saves the objects in ``to_save`` plus the trainer itself (and its AMP grad scaler), so a
    killed run loses at most the epoch in progress. The file is replaced atomically: a kill during
    the write leaves the previous checkpoint intact. Attach it after the ValidationHandler so the
    saved state includes that epoch's validation (e.g. BestModelSaver's best score).
    """

    def __init__(self, path: str, to_save: dict, resume: bool = True, enabled: bool = True,
                 map_location: str | torch.device | None = "cpu") -> None:
        self.path = Path(path)
        self.to_save = dict(to_save)
        self.resume = as_bool(resume, "resume")
        self.enabled = enabled
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        self.to_save["trainer"] = engine
        if getattr(engine, "scaler", None) is not None:
            self.to_save["grad_scaler"] = engine.scaler
        engine.add_event_handler(Events.STARTED, self._load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _load(self, engine: Engine) -> None:
        if not (self.resume and self.path.exists()):
            return
        max_epochs = engine.state.max_epochs
        checkpoint = torch.load(self.path, map_location=self.map_location, weights_only=True)
        Checkpoint.load_objects(to_load=self.to_save, checkpoint=checkpoint)
        if engine.state.epoch > max_epochs:
            raise ValueError(f"{self.path} is at epoch {engine.state.epoch}, past max_epochs={max_epochs}: "
                             "raise max_epochs to train on, or pass --resume false to start over")
        engine.state.max_epochs = max_epochs  # the command line's value, not the checkpoint's
        logger.info("resumed from %s at epoch %d of %d (--resume false starts over)", self.path,
                    engine.state.epoch, max_epochs)

    def _save(self, engine: Engine) -> None:
        if self.enabled:
            state = {name: obj.state_dict() for name, obj in self.to_save.items()}
            atomic_write(self.path, lambda tmp: torch.save(state, tmp))


class TrainingHistory:
    """Writes one JSON row per epoch: training loss (mean over iterations) and the validator's metrics.

    Attach it to the trainer after the ValidationHandler, so that validation has run when an epoch
    is recorded. The file is rewritten after every epoch. A resumed run keeps the rows up to the
    restored epoch (read at the first EPOCH_STARTED, once ResumeCheckpoint has set the epoch) and
    drops those of epochs that were cut off. evaluate.json plots it.
    """

    def __init__(self, path: str, validator: Engine | None = None) -> None:
        self.path = Path(path)
        self.validator = validator
        self.rows: list[dict] | None = None
        self._loss_sum = 0.0
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._forget)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _forget(self, engine: Engine) -> None:
        self.rows = None

    def _reset(self, engine: Engine) -> None:
        if self.rows is None:  # first epoch of this run: keep the rows of the epochs already done
            rows = json.loads(self.path.read_text()) if self.path.exists() else []
            self.rows = [row for row in rows if row["epoch"] < engine.state.epoch]
        self._loss_sum, self._count = 0.0, 0

    def _accumulate(self, engine: Engine) -> None:
        self._loss_sum += float(from_engine(["loss"], first=True)(engine.state.output))
        self._count += 1

    def _record(self, engine: Engine) -> None:
        row = {"epoch": engine.state.epoch, "train_loss": self._loss_sum / max(self._count, 1)}
        validator = self.validator
        if validator is not None and validator.state.epoch == engine.state.epoch:
            row.update({k: float(v) for k, v in validator.state.metrics.items() if np.isscalar(v)})
        self.rows.append(row)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.rows, indent=1)))
        summary = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
        logger.info("epoch %d/%d: %s", engine.state.epoch, engine.state.max_epochs, summary)


class PredictionWriter:
    """Collects every image's class probabilities during a run and writes them as a CSV at its end.

    Columns: image, predicted class, its probability, then one probability per class. Across
    ranks the rows are gathered so that rank 0 writes one file.
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], filename: str = "predictions.csv",
                 enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.filename = filename
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._images: list[str] = []
        self._probabilities: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output
        self._probabilities += [o["pred"].detach().float().cpu() for o in outputs]
        self._labels += [torch.as_tensor(o["label"]).cpu() for o in outputs if o.get("label") is not None]
        self._images += [_image_name(o, b) for o, b in zip(outputs, engine.state.batch)]

    def _gathered(self) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        probabilities = torch.stack(self._probabilities)
        labels = torch.stack(self._labels).reshape(len(self._labels), -1) if self._labels else None
        images = self._images
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            probabilities = evenly_divisible_all_gather(probabilities)
            labels = evenly_divisible_all_gather(labels) if labels is not None else None
            images = string_list_all_gather(images)
        if labels is not None and labels.shape[1] > 1:  # one-hot after postprocessing
            labels = labels.argmax(dim=1)
        return images, probabilities.numpy(), None if labels is None else labels.reshape(-1).long().numpy()

    def _complete(self, engine: Engine) -> None:
        if not self._probabilities:
            raise RuntimeError("no predictions were made: the data loader yielded no images")
        images, probabilities, labels = self._gathered()
        if self.enabled:
            self.write(images, probabilities, labels)

    def write(self, images: list[str], probabilities: np.ndarray, labels: np.ndarray | None) -> None:
        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                out = csv.writer(f)
                out.writerow(["image", "predicted_class", "probability", *(f"p_{c}" for c in self.class_names)])
                for image, p in zip(images, probabilities):
                    top = int(p.argmax())
                    out.writerow([image, self.class_names[top], f"{p[top]:.6f}", *(f"{x:.6f}" for x in p)])

        atomic_write(self.output_dir / self.filename, write_csv)
        logger.info("wrote predictions for %d images to %s", len(images), self.output_dir / self.filename)


class EvaluationReport(PredictionWriter):
    """A PredictionWriter that also writes ``metrics.json`` and the plots of a labelled evaluation.

    Files in ``output_dir``: metrics.json, predictions.csv, roc_curves.png, confusion_matrix.png,
    and training_curves.png when ``history_path`` (from TrainingHistory) exists.
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], history_path: str | None = None,
                 enabled: bool = True) -> None:
        super().__init__(output_dir, class_names, enabled=enabled)
        self.history_path = history_path

    def write(self, images: list[str], probabilities: np.ndarray, labels: np.ndarray | None) -> None:
        from bundle import plots  # matplotlib only where plots are made

        if labels is None:
            raise ValueError("evaluation needs labelled images: the datalist items have no 'label'")
        super().write(images, probabilities, labels)
        report = classification_report(probabilities, labels, self.class_names)
        atomic_write(self.output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
        plots.plot_roc_curves(probabilities, labels, self.class_names, list(report["auc_per_class"].values()),
                              self.output_dir / "roc_curves.png")
        plots.plot_confusion_matrix(report["confusion_matrix"], self.class_names, self.output_dir / "confusion_matrix.png")
        if self.history_path and Path(self.history_path).exists():
            plots.plot_training_curves(json.loads(Path(self.history_path).read_text()),
                                       self.output_dir / "training_curves.png")
        logger.info("evaluation on %d images: auc_macro %s, accuracy %.4f, balanced_accuracy %.4f; wrote %s",
                    report["n_images"], _fmt(report["auc_macro"]), report["accuracy"], report["balanced_accuracy"],
                    self.output_dir / "metrics.json")


def _image_name(output: dict, batch_item: dict) -> str:
    """The image's file: the cached fast path names it in the batch, the per-sample chain in the image's metadata."""
    if "image_path" in batch_item:
        return str(batch_item["image_path"])
    return str(output["image"].meta["filename_or_obj"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
