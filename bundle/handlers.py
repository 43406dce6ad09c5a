"""Ignite handlers the bundle's configs attach to the MONAI engines.

Each does one job that MONAI's stock handlers don't: keep the best model across a resume, keep a
per-epoch history on disk, and turn a finished evaluation or inference into files people use.
"""

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.engines.utils import IterationEvents
from monai.handlers import from_engine
from monai.transforms import Compose, Randomizable
from monai.utils import CommonKeys as Keys
from monai.utils import evenly_divisible_all_gather, string_list_all_gather
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from bundle import calibration, ood
from bundle.atomic import atomic_write, remove_leftovers
from bundle.calibration import Calibration
from bundle.flags import as_bool
from bundle.metrics import balanced_accuracy, classification_report, expected_calibration_error, negative_log_likelihood
from bundle.sidecar import (
    FINGERPRINT,
    complete_interrupted_save,
    load_weights,
    new_record,
    read_sidecar,
    save_pair,
    sidecar_path,
    verified_sidecar,
    write_sidecar,
)

logger = logging.getLogger(__name__)


def plain_state_dict(network: torch.nn.Module) -> dict:
    """The network's weights on the CPU, without a DistributedDataParallel/DataParallel wrapper."""
    return {k: v.detach().cpu() for k, v in _unwrapped(network).state_dict().items()}


class BestModelSaver:
    """Saves the network's plain state_dict to ``save_path`` whenever the key metric improves.

    Attach it to the validation evaluator. Unlike MONAI's key-metric CheckpointSaver, the best score
    is in this handler's ``state_dict()``: put the handler in the resume checkpoint and a resumed run
    never replaces a better model with a worse one.

    With the weights it writes their sidecar (``bundle.sidecar``: ``model.json`` beside ``model.pt``):
    the ``image_size`` [height, width] the network is trained at (a DenseNet served at another size
    runs and mispredicts), the class names, the epoch, the score and the weights' fingerprint, as one
    pair (``bundle.sidecar.save_pair``: a kill between the two writes leaves nothing a loader accepts,
    and the next run completes it). With ``calibrate`` it collects the validation logits
    (postprocessing's ``logits`` key) and labels of every validation run, gathered across ranks, and
    stores in the sidecar the temperature and decision rule fitted on those of the saved model
    (``bundle.calibration``).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        save_path: str,
        metric_name: str,
        image_size: Sequence[int],
        enabled: bool = True,
        calibrate: bool = False,
        ood_target_share: float = ood.TARGET_SHARE,
        ood_class_weights: str = ood.CLASS_WEIGHTS[0],
    ) -> None:
        self.network = network
        self.save_path = save_path
        self.metric_name = metric_name
        self.enabled = enabled  # False on all but one rank under DDP: every rank tracks, one writes
        self.image_size = [int(side) for side in image_size]
        self.validation = ValidationLogits(ood_target_share, ood_class_weights) if calibrate else None
        self.best_metric = -math.inf
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            # a resumed run that never beats its restored best would otherwise never repair the pair
            complete_interrupted_save(self.save_path)
        if self.validation is not None:
            self.validation.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metric = float(engine.state.metrics[self.metric_name])
        improved = math.isfinite(metric) and metric > self.best_metric
        # every rank sees the same (gathered) metric, so all of them join the gather or none does
        fitted, guard = self.validation.fit() if improved and self.validation is not None else (None, None)
        if not improved:
            return
        self.best_metric, self.best_epoch = metric, engine.state.epoch
        if not self.enabled:
            return
        state = plain_state_dict(self.network)
        record = {
            **new_record(state, self.image_size),
            "epoch": self.best_epoch,
            "metric": {self.metric_name: self.best_metric},
        }
        if fitted is not None:
            record["calibration"] = fitted.to_json()
        if guard is not None:
            record["ood"] = ood.store(self.save_path, guard, record[FINGERPRINT])
        save_pair(self.save_path, state, record)
        ood.remove_stale(self.save_path)
        logger.info(
            "epoch %d: %s improved to %.4f, saved %s%s",
            self.best_epoch,
            self.metric_name,
            metric,
            self.save_path,
            "" if fitted is None else f" ({_fit_summary(fitted, guard)})",
        )

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        # A kill between saving model.pt and the epoch's checkpoint leaves model.pt an epoch ahead of the best
        # score the checkpoint holds: the resumed run must beat model.pt's own score to replace it. (Every rank
        # reads the same file: a restarted multi-host job gets the checkpoint folder back on every host.)
        saved = read_sidecar(self.save_path) if Path(self.save_path).is_file() else None
        metric = (saved or {}).get("metric", {}).get(self.metric_name)
        if metric is not None and int(saved.get("epoch", -1)) > self.best_epoch and metric > self.best_metric:
            self.best_metric, self.best_epoch = float(metric), int(saved["epoch"])


class PredictionsToCPU:
    """Moves an evaluator's predictions (as float32) and labels to the CPU a whole batch at a time,
    between the forward pass and the split into images.

    The evaluator's postprocessing runs on each image on its own, moving each prediction and label to
    the CPU separately: two copies from the GPU per image, each waiting for it. After this handler
    those moves find their tensors already there. Attach it to an evaluator with ``postprocessing``.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._move)

    def _move(self, engine: Engine) -> None:
        output = engine.state.output
        output[Keys.PRED] = output[Keys.PRED].detach().float().cpu()
        if isinstance(output.get(Keys.LABEL), torch.Tensor):
            output[Keys.LABEL] = output[Keys.LABEL].detach().cpu()


class ValidationLogits:
    """Collects a validation run's logits (postprocessing's ``logits`` key), labels and, when a
    ``FeatureCollector`` is attached, pooled features, for the calibration and guard fits.

    ``fit()`` gathers them across ranks (a collective call under DDP: every rank must make it) and
    returns ``bundle.calibration.fit`` of them, and ``bundle.ood.fit`` of them (None without features),
    with the guard's statistics from ``reference`` (training features and labels) when given.
    """

    def __init__(
        self, ood_target_share: float = ood.TARGET_SHARE, ood_class_weights: str = ood.CLASS_WEIGHTS[0]
    ) -> None:
        self.ood_target_share = ood.check_target_share(ood_target_share)
        self.ood_class_weights = ood.check_class_weights(ood_class_weights)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _reset(self, engine: Engine) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._features: list[torch.Tensor] = []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        logits = output_rows(output, "logits").float()
        self._logits.append(logits)
        self._labels.append(output_rows(output, "label").reshape(len(logits), -1))
        features = output_rows(output, "features")
        if features is not None:
            self._features.append(features.float())

    @property
    def has_features(self) -> bool:
        """Whether the run collected features (a ``FeatureCollector`` was attached): a guard can be fitted."""
        return bool(self._features)

    def fit(
        self, reference: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[Calibration, ood.GuardFit | None]:
        logits, labels = torch.cat(self._logits), torch.cat(self._labels)
        features = torch.cat(self._features) if self._features else None
        if _distributed():
            logits, labels = evenly_divisible_all_gather(logits), evenly_divisible_all_gather(labels)
            features = None if features is None else evenly_divisible_all_gather(features)
        labels = labels.argmax(1) if labels.shape[1] > 1 else labels[:, 0].long()  # one-hot after postprocessing
        guard = (
            None
            if features is None
            else ood.fit(logits, features, labels, self.ood_target_share, self.ood_class_weights, reference)
        )
        return calibration.fit(logits, labels, logits.shape[1]), guard


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def split_outputs(evaluator: Engine, loader, split: str, progress: bool = False) -> tuple[torch.Tensor, ...]:
    """The logits (N, C), pooled features (N, F) and class indices (N,) of every image ``loader`` gives, through
    ``evaluator``'s network and inferer in its precision (validation's test-time views: the logits and features
    the guard serves), on the CPU and gathered across ranks (a collective call under DDP)."""
    network, device = evaluator.network, evaluator.state.device
    tap, was_training, autotuned = ood.FeatureTap(network), network.training, torch.backends.cudnn.benchmark
    logits, features, labels = [], [], []
    network.eval()
    # one pass at a batch shape validation never had: cuDNN's default algorithms, not an autotuning of every layer
    torch.backends.cudnn.benchmark = False
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=f"out-of-distribution guard: {split} features", disable=not progress):
                with torch.autocast("cuda", **evaluator.amp_kwargs) if evaluator.amp else contextlib.nullcontext():
                    logits.append(evaluator.inferer(batch["image"].to(device), network).float().cpu())
                features.append(tap.take(len(logits[-1])))
                labels.append(batch["label"].cpu().long())
    finally:
        tap.close()
        network.train(was_training)
        torch.backends.cudnn.benchmark = autotuned
    outputs = tuple(torch.cat(rows) for rows in (logits, features, labels))
    return tuple(evenly_divisible_all_gather(rows) for rows in outputs) if _distributed() else outputs


class FeatureCollector:
    """Keeps what the out-of-distribution guard reads in the engine's output: the pooled features of each
    batch (``bundle.ood.FeatureTap`` on the engine's network) under ``features`` and the network's logits
    under ``logits`` (before the postprocessing turns ``pred`` into probabilities), for the guard's fit,
    report and batch answers. Attach it to an evaluator. The tap lives for one run of the engine, so a
    forward pass of the same network elsewhere (``split_outputs``) is not collected here, provided this handler
    comes before the handler making that pass at the end of the run (ignite calls an event's handlers in the
    order they were attached: configs/calibrate.json lists it before ``CalibrationFitter``)."""

    def attach(self, engine: Engine) -> None:
        self.tap: ood.FeatureTap | None = None
        # MONAI attaches handlers before the evaluator holds its network: tap it when each run starts
        engine.add_event_handler(Events.STARTED, self._tap)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._untap)

    def _tap(self, engine: Engine) -> None:
        self._untap(engine)  # left by a run that raised
        self.tap = ood.FeatureTap(engine.network)

    def _untap(self, engine: Engine) -> None:
        if self.tap is not None:
            self.tap.close()
            self.tap = None

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        output["features"] = self.tap.take(len(output[Keys.PRED]))
        output["logits"] = output[Keys.PRED].detach().float().cpu()


class CalibrationFitter:
    """Fits the calibration of the weights ``ckpt_path`` on one validation run and stores it in
    their sidecar (configs/calibrate.json). Training fits it itself; this is for a model trained
    before calibration existed, or to re-fit on another validation split. The rest of the sidecar
    is kept. Weights without a sidecar, or with one from before sidecars recorded the weights'
    fingerprint, are refused unless ``allow_missing_sidecar``: then they get a full one recording
    ``image_size``, the class order and the fingerprint, and every loader accepts them from then on.
    With a ``reference_loader`` (the training split, ``ood_statistics: training``) the guard's
    statistics come from its images' features, its thresholds from validation's.
    """

    def __init__(
        self,
        ckpt_path: str,
        image_size: Sequence[int],
        enabled: bool = True,
        allow_missing_sidecar: bool | str = False,
        ood_target_share: float = ood.TARGET_SHARE,
        ood_class_weights: str = ood.CLASS_WEIGHTS[0],
        reference_loader=None,
    ) -> None:
        self.ckpt_path = ckpt_path
        self.image_size = [int(side) for side in image_size]
        self.enabled = enabled
        self.allow_missing_sidecar = as_bool(allow_missing_sidecar, "allow_missing_sidecar")
        self.validation = ValidationLogits(ood_target_share, ood_class_weights)
        self.reference_loader = reference_loader

    def attach(self, engine: Engine) -> None:
        self.validation.attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._store)

    def _store(self, engine: Engine) -> None:
        reference = None
        if self.reference_loader is not None and self.validation.has_features:  # no features: no guard to fit
            _, *reference = split_outputs(engine, self.reference_loader, "training", self.enabled)
        fitted, guard = self.validation.fit(reference)
        if not self.enabled:
            return
        weights = load_weights(self.ckpt_path)
        record = verified_sidecar(self.ckpt_path, weights, self.allow_missing_sidecar) or {}
        record = {
            **record,
            **new_record(weights, record.get("image_size", self.image_size)),
            "calibration": fitted.to_json(),
        }
        if guard is not None:
            record["ood"] = ood.store(self.ckpt_path, guard, record[FINGERPRINT])
        write_sidecar(self.ckpt_path, record)
        ood.remove_stale(self.ckpt_path)
        logger.info(
            "fitted on %d validation images: temperature %.3f (ECE %.4f -> %.4f), decision tau %.2f "
            "(balanced accuracy %.4f -> %.4f), %s%s; stored in %s",
            fitted.fit["n_images"],
            fitted.temperature,
            fitted.fit["ece_before"],
            fitted.fit["ece_after"],
            fitted.fit["tau"],
            fitted.fit["balanced_accuracy_argmax"],
            fitted.fit["balanced_accuracy_rule"],
            _refer_summary(fitted),
            _guard_summary(guard),
            sidecar_path(self.ckpt_path),
        )


class TrainingSplitGuard:
    """With ``statistics`` "training" (config key ``ood_statistics``), refits the out-of-distribution guard of
    the saved best model once training completes: its statistics from the training split's features
    (``reference_loader``: the training images without augmentation), its thresholds from the validation
    images' scores under them (``bundle.ood.fit``'s ``reference``). The temperature and the rest of the
    sidecar stay.

    Training fits the guard on validation alone whenever it saves a better model: a pass over the training
    split at each of those would cost about five validations. This pass is made once, with the best weights
    (read by the main rank, sent to the others) in ``validator``'s network, whose own weights it puts back
    afterwards. Attach it to the trainer after the handlers that save. Under DDP each rank passes its own
    training shard and the features are gathered; the shards' padding (``even_divisible``: up to world size - 1
    images repeated) is among the statistics' images, a negligible weight in ~7,000.
    """

    def __init__(
        self,
        statistics: str,
        validator: Engine,
        reference_loader,
        ckpt_path: str,
        ood_target_share: float = ood.TARGET_SHARE,
        ood_class_weights: str = ood.CLASS_WEIGHTS[0],
        enabled: bool = True,
    ) -> None:
        self.statistics = ood.check_statistics(statistics)
        self.validator = validator
        self.reference_loader = reference_loader
        self.ckpt_path = ckpt_path
        self.ood_target_share = ood.check_target_share(ood_target_share)
        self.ood_class_weights = ood.check_class_weights(ood_class_weights)
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.statistics == "training":
            engine.add_event_handler(Events.COMPLETED, self)

    def _best_weights(self) -> dict | None:
        """The saved weights as the main rank reads them, on every rank; an error reading them is raised on
        every rank too, so that no rank waits for the others in a collective call that never comes."""
        best: list = [None]
        error = None
        if self.enabled and Path(self.ckpt_path).is_file():
            try:
                best = [load_weights(self.ckpt_path)]
            except Exception as caught:
                error, best = caught, [f"{type(caught).__name__}: {caught}"]  # text: any error crosses ranks
        if _distributed():
            torch.distributed.broadcast_object_list(best, src=0)
        if isinstance(best[0], str):
            raise RuntimeError(f"the guard's refit on the training split cannot read the weights: {best[0]}") from error
        return best[0]

    def __call__(self, engine: Engine) -> None:
        best = self._best_weights()
        if best is None:
            logger.warning("no %s: the out-of-distribution guard is not refitted on the training split", self.ckpt_path)
            return
        network = _unwrapped(self.validator.network)
        current = {key: value.detach().clone() for key, value in network.state_dict().items()}
        network.load_state_dict(best)
        try:
            logits, features, labels = split_outputs(
                self.validator, self.validator.data_loader, "validation", self.enabled
            )
            _, *reference = split_outputs(self.validator, self.reference_loader, "training", self.enabled)
        finally:
            network.load_state_dict(current)
        guard = ood.fit(logits, features, labels, self.ood_target_share, self.ood_class_weights, reference)
        if not self.enabled:
            return
        record = verified_sidecar(self.ckpt_path, best)
        record["ood"] = ood.store(self.ckpt_path, guard, record[FINGERPRINT])
        write_sidecar(self.ckpt_path, record)
        ood.remove_stale(self.ckpt_path)
        logger.info(
            "refitted the guard of %s on the training split's %d images%s",
            self.ckpt_path,
            guard.record["n_statistics_images"],
            _guard_summary(guard),
        )


def _fit_summary(fitted: Calibration, guard: ood.GuardFit | None) -> str:
    return (
        f"temperature {fitted.temperature:.3f}, decision tau {fitted.fit['tau']:.2f}, {_refer_summary(fitted)}"
        f"{_guard_summary(guard)}"
    )


def _guard_summary(guard: ood.GuardFit | None) -> str:
    if guard is None:
        return ""
    thresholds = ", ".join(f"{method} {value:.4g}" for method, value in guard.thresholds.items())
    return f", out-of-distribution thresholds keeping {guard.target_share:.0%} of validation: {thresholds}"


def _refer_summary(fitted: Calibration) -> str:
    """The refer threshold and its validation sensitivity, or why there is none."""
    triage = fitted.fit.get("triage")
    if fitted.refer_threshold is None or triage is None:
        return "no refer threshold (no malignant validation image)" if triage else "no refer threshold"
    return (
        f"refer at malignant probability >= {fitted.refer_threshold:.4f} "
        f"(validation sensitivity {triage['sensitivity']:.3f}, specificity {_fmt(triage['specificity'])})"
    )


class WeightAverage:
    """An exponential moving average of the network's weights (and batch-norm statistics), updated
    after every training step; validation, model selection and the saved model use the average.

    A from-scratch DenseNet's weights jump from step to step, and so does its validation score: the
    best epoch becomes a lucky spike. The average over the last ``epochs`` epochs' steps (decay
    ``1 - 1 / (epochs * steps_per_epoch)``) moves smoothly and usually scores higher. ``epochs`` 0
    turns it off: ``model`` is then the network itself. Put it in the resume checkpoint.
    """

    def __init__(self, network: torch.nn.Module, epochs: float, steps_per_epoch: int) -> None:
        self.network = network
        self.enabled = float(epochs) > 0
        if float(epochs) < 0:
            raise ValueError(f"config key 'ema_epochs' must be 0 (off) or positive, got {epochs}")
        self.decay = 1.0 - 1.0 / max(float(epochs) * int(steps_per_epoch), 1.0) if self.enabled else 0.0
        # AveragedModel holds the copy and its checkpoint format; the update is ours (see _update)
        self.averaged = AveragedModel(_unwrapped(network), use_buffers=True) if self.enabled else None
        self._empty = True
        if self.enabled:  # paired once: loading a state or stepping the optimizer changes tensors in place
            pairs = list(zip(_tensors(self.averaged.module), _tensors(_unwrapped(network)), strict=True))
            floats = [pair for pair in pairs if pair[0].is_floating_point()]
            counts = [pair for pair in pairs if not pair[0].is_floating_point()]
            self._floats = [list(side) for side in zip(*floats, strict=True)]  # [averaged, network]
            self._counts = [list(side) for side in zip(*counts, strict=True)]

    @property
    def model(self) -> torch.nn.Module:
        """What to validate and save: the average, or the network itself when averaging is off."""
        return self.averaged.module if self.enabled else self.network

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)

    @torch.no_grad()
    def _update(self, engine: Engine) -> None:
        """One step of the average, queued on the device without waiting for it.

        ``AveragedModel.update_parameters`` reads its step count from the device twice per call, and
        each read waits for the GPU to finish the step; here the "first step?" flag is a Python bool.
        Float tensors (weights, batch-norm statistics) move towards the network's; integer ones
        (batch counts) are copied.
        """
        if self._empty:
            torch._foreach_copy_(*self._floats)
            self._empty = False
        else:
            torch._foreach_lerp_(*self._floats, 1.0 - self.decay)
        if self._counts:
            torch._foreach_copy_(*self._counts)
        self.averaged.n_averaged += 1

    def state_dict(self) -> dict:
        return self.averaged.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled:
            self.averaged.load_state_dict(state)
            self._empty = int(self.averaged.n_averaged) == 0


def _unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "module", network)


def _tensors(module: torch.nn.Module):
    """A module's parameters, then its buffers, in a fixed order."""
    return itertools.chain(module.parameters(), module.buffers())


def training_fingerprint(datalist: str | os.PathLike, image_size: Sequence[int], network: torch.nn.Module) -> dict:
    """What a training run trains on, as the resume checkpoint records it: the datalist's training and
    validation items (``bundle.data.datalist_fingerprint``), the image size, and the network's
    architecture (its class and every parameter's and buffer's name, shape and dtype)."""
    from bundle.data import datalist_fingerprint

    digest = hashlib.sha256()
    for name, tensor in sorted(_unwrapped(network).state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
    return {
        "datalist": datalist_fingerprint(datalist),
        "image_size": [int(side) for side in image_size],
        "network": f"{type(_unwrapped(network)).__name__}:sha256:{digest.hexdigest()}",
    }


def check_resume(
    path: str | os.PathLike,
    resume: bool | str,
    trained_on: dict | None,
    checkpoint: dict | None = None,
    max_epochs: int | None = None,
) -> None:
    """Before any work: with ``resume``, the checkpoint at ``path`` (if any) loads, was trained on ``trained_on``
    (None: not checked) and is not past ``max_epochs``.

    Resuming another run's checkpoint would continue it and keep its best score, so the new run's
    model.pt might never be written; a mismatch is an error naming ``--resume false``.
    """
    path = Path(path)
    if not (as_bool(resume, "resume") and path.exists()):
        return
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    if max_epochs is not None and "trainer" in checkpoint:
        epoch = checkpoint["trainer"]["iteration"] // checkpoint["trainer"]["epoch_length"]
        if epoch > int(max_epochs):
            raise ValueError(
                f"{path} is at epoch {epoch}, past max_epochs={max_epochs}: "
                "raise max_epochs to train on, or pass --resume false to start over"
            )
    if trained_on is None:
        return
    recorded = checkpoint.get("trained_on")
    if recorded is None:
        differences = ["it records nothing about what it was trained on (written before checkpoints did)"]
    else:
        differences = [
            f"{key} {recorded.get(key)!r}, this run's is {value!r}"
            for key, value in trained_on.items()
            if recorded.get(key) != value
        ]
    if differences:
        best = checkpoint.get("best_model_saver", {}).get("best_metric")
        raise ValueError(
            f"cannot resume from {path}: it was trained on something else: " + "; ".join(differences) + ". "
            f"Resuming would continue that run and keep its best score ({best}), so this run's model might never "
            "be saved. Pass --resume false to start over (it replaces that checkpoint), or another --ckpt_dir"
        )


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """The resume checkpoint at ``path``; one that does not load (cut off by a full disk, say) is an error naming
    it and ``--resume false``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(
            f"cannot resume from {path}: it does not load ({type(error).__name__}: {error}). Pass --resume false to "
            "start over (it replaces that checkpoint), or another --ckpt_dir"
        ) from None


class ResumeCheckpoint:
    """Keeps ``path`` holding everything needed to resume training, rewritten after every epoch.

    At the trainer's start it restores the checkpoint if one exists (and ``resume``); after each
    epoch it saves the objects in ``to_save`` plus the trainer itself (and its AMP grad scaler), so a
    killed run loses at most the epoch in progress. The file is replaced atomically: a kill during
    the write leaves the previous checkpoint intact. Attach it after the ValidationHandler so the
    saved state includes that epoch's validation (e.g. BestModelSaver's best score).

    ``trained_on`` (``training_fingerprint``) is saved with it; a checkpoint trained on anything else
    is refused (``check_resume``, which train.json's initialize also runs, before any work).
    """

    def __init__(
        self,
        path: str,
        to_save: dict,
        resume: bool = True,
        enabled: bool = True,
        map_location: str | torch.device | None = "cpu",
        trained_on: dict | None = None,
    ) -> None:
        self.path = Path(path)
        # the bare network under DDP: a checkpoint then resumes with any number of processes, one included
        self.to_save = {name: _bare(obj) for name, obj in to_save.items()}
        self.resume = as_bool(resume, "resume")
        self.enabled = enabled
        self.map_location = map_location
        self.trained_on = trained_on

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            for leftover in remove_leftovers(self.path.parent):
                logger.warning("removed %s, left by a run killed while saving", leftover)
        self.to_save["trainer"] = engine
        if getattr(engine, "scaler", None) is not None:
            self.to_save["grad_scaler"] = engine.scaler
        engine.add_event_handler(Events.STARTED, self._load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _load(self, engine: Engine) -> None:
        if not (self.resume and self.path.exists()):
            return
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        checkpoint = read_checkpoint(self.path, self.map_location)
        check_resume(self.path, self.resume, self.trained_on, checkpoint, max_epochs)
        # this run's settings, as its config built them, before the checkpoint's replace them
        optimizers = {obj: _group_settings(obj) for obj in self.to_save.values() if isinstance(obj, Optimizer)}
        schedulers = {obj: obj.state_dict() for obj in self.to_save.values() if isinstance(obj, LRScheduler)}
        for name, obj in self.to_save.items():  # written by a DDP run before checkpoints held the bare network
            if name in checkpoint and isinstance(obj, torch.nn.Module) and not isinstance(obj, AveragedModel):
                consume_prefix_in_state_dict_if_present(checkpoint[name], "module.")
        # random streams were checkpointed from 2026-12-07 on: an earlier checkpoint resumes without them
        to_load = {
            name: obj for name, obj in self.to_save.items() if name in checkpoint or not isinstance(obj, RandomStates)
        }
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        # The checkpoint gives the progress (epochs done), the weights and the optimizer's moments; this run's
        # config gives everything else: its max_epochs, its batch size and process count (the steps an epoch
        # has), its learning rate, weight decay and schedule, which then continues from the epochs done.
        engine.state.max_epochs = max_epochs
        steps = engine.state.epoch * epoch_length  # checkpoints are written at an epoch's end
        engine.state.epoch_length, engine.state.iteration = epoch_length, steps
        for optimizer, settings in optimizers.items():
            for group, configured in zip(optimizer.param_groups, settings, strict=True):
                group.update(configured)
        for scheduler, configured in schedulers.items():
            scheduler.load_state_dict({**configured, "last_epoch": steps - 1, "_step_count": steps})
            scheduler.step()  # to step ``steps``, writing its learning rate into the optimizer
        logger.info(
            "resumed from %s at epoch %d of %d (--resume false starts over)", self.path, engine.state.epoch, max_epochs
        )

    def _save(self, engine: Engine) -> None:
        if self.enabled:
            state = {name: obj.state_dict() for name, obj in self.to_save.items()}
            if self.trained_on is not None:
                state["trained_on"] = self.trained_on
            atomic_write(self.path, lambda tmp: torch.save(state, tmp))


class RandomStates:
    """The random streams of a run's data path (batch order, class-balanced draws, augmentation, mixing), for
    the resume checkpoint: a resumed run goes on with the streams where the killed one left them, instead of
    replaying its first epoch's batches and draws. ``parts``: objects with ``random_state`` /
    ``set_random_state``, a ``generator`` attribute (a ``torch.Generator``, as torch's samplers have), or a list
    of MONAI transforms (the chain's augmentation: their own numpy streams); others (None, a loader with no
    stream of its own) are skipped. torch's global stream comes too: a DataLoader without a generator draws
    each epoch's shuffle (and its workers' seeds) from it, and dropout its masks on a CPU."""

    def __init__(self, **parts) -> None:
        self.parts = {"torch_global": _GlobalTorchStream()}
        for name, part in parts.items():
            if isinstance(part, (list, tuple, Compose)):
                part = _TransformStreams(part)
            if hasattr(part, "random_state") or isinstance(getattr(part, "generator", None), torch.Generator):
                self.parts[name] = part

    def state_dict(self) -> dict:
        return {
            name: part.random_state() if hasattr(part, "random_state") else {"torch": part.generator.get_state()}
            for name, part in self.parts.items()
        }

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            if name not in state:
                continue  # a part this run has and the checkpointed one had not (e.g. a sampler turned on)
            if hasattr(part, "set_random_state"):
                part.set_random_state(state[name])
            else:
                part.generator.set_state(state[name]["torch"].cpu())  # loaded onto the run's device


class _GlobalTorchStream:
    def random_state(self) -> dict:
        return {"torch": torch.get_rng_state()}

    def set_random_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].cpu())


class _TransformStreams:
    """The numpy streams (``R``) of the randomised MONAI transforms in a list or ``Compose``, in order."""

    def __init__(self, transforms) -> None:
        self.transforms = list(_randomizables(transforms, set()))

    def random_state(self) -> dict:
        states = [transform.R.get_state(legacy=False) for transform in self.transforms]
        # as tensors: a checkpoint loads with weights_only, which refuses numpy arrays
        return {"numpy": [{**state, "state": _tensors_of(state["state"])} for state in states]}

    def set_random_state(self, state: dict) -> None:
        for transform, saved in zip(self.transforms, state["numpy"], strict=True):
            transform.R.set_state({**saved, "state": {**saved["state"], "key": saved["state"]["key"].cpu().numpy()}})


def _tensors_of(state: dict) -> dict:
    return {
        key: torch.from_numpy(value.astype(np.int64)) if isinstance(value, np.ndarray) else value
        for key, value in state.items()
    }


def _randomizables(obj, seen: set):
    """The randomised transforms in ``obj`` (a transform, a list or a ``Compose``), with those they hold (a
    dictionary transform draws through the array transform inside it too), each once."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _randomizables(item, seen)
    elif isinstance(obj, Compose):
        yield from _randomizables(obj.transforms, seen)
    elif isinstance(obj, Randomizable):
        yield obj
        for value in vars(obj).values():
            if isinstance(value, (Randomizable, Compose, list, tuple)):
                yield from _randomizables(value, seen)


def _bare(obj):
    return obj.module if isinstance(obj, DistributedDataParallel) else obj


def _group_settings(optimizer: Optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (learning rate, weight decay, betas, fused...), without its
    parameters."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


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
        self._loss_sum: torch.Tensor | float = 0.0
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
        self._loss_sum, self._count, self._images = 0.0, 0, 0
        self._started, self._trained_s = _device_clock(engine), None

    def _accumulate(self, engine: Engine) -> None:
        # summed on the loss's device and read once per epoch: reading it every step would wait for the GPU
        self._loss_sum = self._loss_sum + from_engine(["loss"], first=True)(engine.state.output).detach().float()
        self._count += 1
        self._images += len(engine.state.batch["image"])
        if engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length == 0:
            # the epoch's last step, before its validation: the time of the training work itself, once the
            # device has done it (ignite's epoch time is the host's, which runs up to several steps ahead)
            self._trained_s = _device_clock(engine) - self._started

    def _record(self, engine: Engine) -> None:
        row = {"epoch": engine.state.epoch, "train_loss": float(self._loss_sum) / max(self._count, 1)}
        if self._trained_s:
            row.update(train_s=self._trained_s, train_img_per_s=self._images / self._trained_s)
        device = engine.state.device
        if device is not None and torch.device(device).type == "cuda":  # what a run needs, to fit several on one GPU
            row["device_peak_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        validator = self.validator
        if validator is not None and validator.state.epoch == engine.state.epoch:
            row.update({k: float(v) for k, v in validator.state.metrics.items() if np.isscalar(v)})
            if validator.state.times.get(Events.COMPLETED.name):
                row["validation_s"] = validator.state.times[Events.COMPLETED.name]
        self.rows.append(row)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.rows, indent=1)))
        summary = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
        logger.info("epoch %d/%d: %s", engine.state.epoch, engine.state.max_epochs, summary)


def _device_clock(engine: Engine) -> float:
    """Seconds on a monotonic clock once the engine's device has finished the work queued so far."""
    device = engine.state.device
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PredictionWriter:
    """Collects every image's class probabilities during a run and writes them as a CSV at its end.

    Columns: image, predicted class, its probability, one probability per class, then the most probable
    class, the decision rule that chose the predicted class (``calibration``'s: ``balanced``, or
    ``argmax`` without a fitted rule or when configured), the malignant probability (akiec + bcc + mel),
    ``refer`` (true/false at the sidecar's refer threshold; empty without one), and the out-of-distribution
    guard's flag and score (empty without a ``guard``), as served: an image the guard flags has no class,
    probabilities or referral unless ``ood_probabilities``. The guard reads the pooled features that
    ``FeatureCollector`` puts in the output. Across ranks the rows are gathered so that rank 0 writes one file.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        filename: str = "predictions.csv",
        enabled: bool = True,
        calibration: Calibration | None = None,
        guard: ood.Guard | None = None,
        ood_probabilities: bool | str = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.filename = filename
        self.enabled = enabled
        self.calibration = calibration or Calibration()
        self.guard = guard
        self.ood_probabilities = as_bool(ood_probabilities, "ood_probabilities")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._images: list[str] = []
        self._probabilities: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._features: list[torch.Tensor] = []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output
        probabilities = output_rows(outputs, "pred").float()
        self._probabilities.append(probabilities)
        for key, kept in (("logits", self._logits), ("features", self._features)):
            rows = output_rows(outputs, key)
            if rows is not None:
                kept.append(rows.float())
        labels = output_rows(outputs, "label")
        if labels is not None:
            self._labels.append(labels.reshape(len(probabilities), -1))
        self._images += _image_names(outputs, engine.state.batch)

    def _gathered(self) -> dict:
        collected = {
            "probabilities": torch.cat(self._probabilities),
            "logits": torch.cat(self._logits) if self._logits else None,
            "labels": torch.cat(self._labels) if self._labels else None,
            "features": torch.cat(self._features) if self._features else None,
        }
        images = self._images
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            collected = {k: None if v is None else evenly_divisible_all_gather(v) for k, v in collected.items()}
            images = string_list_all_gather(images)
        labels = collected["labels"]
        if labels is not None:
            labels = labels.argmax(dim=1) if labels.shape[1] > 1 else labels  # one-hot after postprocessing
            collected["labels"] = labels.reshape(-1).long().numpy()
        collected = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in collected.items()}
        return {"images": images, **collected}

    def _complete(self, engine: Engine) -> None:
        if not self._probabilities:
            raise RuntimeError("no predictions were made: the data loader yielded no images")
        gathered = self._gathered()
        _check_finite(gathered["images"], gathered["probabilities"])
        if self.enabled:
            self.write(**gathered)

    def write(
        self,
        images: list[str],
        probabilities: np.ndarray,
        labels: np.ndarray | None,
        logits: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> None:
        predicted = self.calibration.decide(probabilities)
        self._write_csv(images, probabilities, predicted, self._guard_scores(logits, features))

    def _guard_scores(
        self, logits: np.ndarray | None, features: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The guard's score and threshold of every image (None without a guard)."""
        if self.guard is None:
            return None
        if logits is None or (self.guard.needs_features and features is None):
            raise RuntimeError(
                f"the out-of-distribution guard ({self.guard.method}) needs each image's logits and pooled features: "
                "attach bundle.handlers.FeatureCollector to the evaluator"
            )
        logits = torch.as_tensor(logits)
        scores = self.guard.scores(logits, None if features is None else torch.as_tensor(features))
        return scores, self.guard.thresholds(logits)

    def _write_csv(
        self,
        images: list[str],
        probabilities: np.ndarray,
        predicted: np.ndarray,
        guard: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        malignant = calibration.malignant_probability(probabilities)
        refer = self.calibration.refer(malignant)
        rule = self.calibration.decision_rule
        flagged = None if guard is None else guard[0] > guard[1]

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                out = csv.writer(f)
                out.writerow(
                    [
                        "image",
                        "predicted_class",
                        "probability",
                        *(f"p_{c}" for c in self.class_names),
                        "most_probable_class",
                        "decision_rule",
                        "malignant_probability",
                        "refer",
                        "out_of_distribution",
                        "ood_score",
                        "ood_threshold",
                    ]
                )
                for i, (image, p, top) in enumerate(zip(images, probabilities, predicted, strict=True)):
                    answer = [
                        self.class_names[top],
                        f"{p[top]:.6f}",
                        *(f"{x:.6f}" for x in p),
                        self.class_names[int(np.argmax(p))],
                        rule,
                        f"{malignant[i]:.6f}",
                        "" if refer is None else str(bool(refer[i])).lower(),
                    ]
                    ood_cells = ["", "", ""]
                    if flagged is not None:
                        ood_cells = [str(bool(flagged[i])).lower(), f"{guard[0][i]:.6g}", f"{guard[1][i]:.6g}"]
                        if flagged[i] and not self.ood_probabilities:
                            answer = [""] * len(answer)  # no diagnosis, as served
                    out.writerow([image, *answer, *ood_cells])

        atomic_write(self.output_dir / self.filename, write_csv)
        flagged_note = "" if flagged is None else f" ({int(flagged.sum())} out of distribution)"
        logger.info(
            "wrote predictions for %d images%s to %s", len(images), flagged_note, self.output_dir / self.filename
        )


def _check_finite(images: list[str], probabilities: np.ndarray) -> None:
    """Non-finite outputs would become class 0 under the decision rule and a NaN ECE (invalid JSON) with
    ordinary-looking AUCs: refused instead, naming the images."""
    bad = [image for image, row in zip(images, np.isfinite(probabilities).all(1), strict=True) if not row]
    if bad:
        raise ValueError(
            f"the network gave non-finite outputs for {len(bad)} of {len(images)} images (e.g. {bad[:3]}): "
            "damaged weights, or an input the preprocessing let through; nothing was written"
        )


class EvaluationReport(PredictionWriter):
    """A PredictionWriter that also writes ``metrics.json`` and the plots of a labelled evaluation.

    Files in ``output_dir``: metrics.json, predictions.csv, roc_curves.png, confusion_matrix.png,
    reliability.png, malignant_roc.png, and training_curves.png when ``history_path`` (from
    TrainingHistory) exists. The class metrics follow the served decision rule, with the argmax's
    accuracy and balanced accuracy beside them; ``triage`` is the refer answer's operating point at the
    threshold fitted on validation (``bundle.calibration.triage_report``); with the logits
    (postprocessing's ``logits`` key) the report adds the calibration before and after temperature scaling.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        history_path: str | None = None,
        enabled: bool = True,
        calibration: Calibration | None = None,
        guard: ood.Guard | None = None,
        ckpt_path: str | None = None,
        split: str | None = None,
    ) -> None:
        # the report keeps every image's probabilities, flagged or not, to measure the model on all of them
        super().__init__(
            output_dir, class_names, enabled=enabled, calibration=calibration, guard=guard, ood_probabilities=True
        )
        self.history_path = history_path
        self.ckpt_path = ckpt_path
        self.split = split

    def write(
        self,
        images: list[str],
        probabilities: np.ndarray,
        labels: np.ndarray | None,
        logits: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> None:
        from bundle import plots  # matplotlib only where plots are made

        if labels is None:
            raise ValueError("evaluation needs labelled images: the datalist items have no 'label'")
        predicted = self.calibration.decide(probabilities)
        guard = self._guard_scores(logits, features)
        self._write_csv(images, probabilities, predicted, guard)
        report = {"split": self.split, **classification_report(probabilities, labels, self.class_names, predicted)}
        if self.split == "validation":
            # the split model selection, the temperature, the decision rule and the refer threshold were fitted on
            report["in_sample"] = True
            logger.warning(
                "evaluated on the validation split (the datalist has no testing split): the model was selected and "
                "calibrated on these images, so these figures are in-sample and optimistic"
            )
        argmax = probabilities.argmax(1)
        report["accuracy_argmax"] = float((argmax == labels).mean())
        report["balanced_accuracy_argmax"] = balanced_accuracy(labels, argmax, len(self.class_names))
        report["decision_rule"] = {
            "rule": self.calibration.decision_rule,
            "class_bias": self.calibration.to_json()["class_bias"],
            "tau": self.calibration.fit.get("tau"),
        }
        report["triage"] = calibration.triage_report(probabilities, labels, self.calibration.refer_threshold)
        uncalibrated = None
        if logits is not None:
            uncalibrated = torch.softmax(torch.as_tensor(logits), -1).numpy()
            report["calibration"] = {
                "temperature": self.calibration.temperature,
                "expected_calibration_error_before": expected_calibration_error(uncalibrated, labels),
                "expected_calibration_error_after": report["expected_calibration_error"],
                "nll_before": negative_log_likelihood(uncalibrated, labels),
                "nll_after": negative_log_likelihood(probabilities, labels),
                "fitted_on_validation": self.calibration.fit,
            }
        if guard is not None:
            report["ood"] = self._guard_report(*guard, labels, logits, features)
            path = self.output_dir / "ood_scores.png"
            plots.plot_ood_scores(guard[0], labels, self.class_names, report["ood"], path)
        atomic_write(self.output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
        plots.plot_roc_curves(
            probabilities,
            labels,
            self.class_names,
            list(report["auc_per_class"].values()),
            self.output_dir / "roc_curves.png",
        )
        plots.plot_confusion_matrix(
            report["confusion_matrix"], self.class_names, self.output_dir / "confusion_matrix.png"
        )
        plots.plot_reliability(
            probabilities,
            labels,
            self.output_dir / "reliability.png",
            uncalibrated=uncalibrated,
            temperature=self.calibration.temperature,
        )
        plots.plot_malignant_roc(
            calibration.malignant_probability(probabilities),
            np.isin(labels, calibration.MALIGNANT_INDICES),
            report["triage"],
            self.output_dir / "malignant_roc.png",
        )
        if self.history_path and Path(self.history_path).exists():
            plots.plot_training_curves(
                json.loads(Path(self.history_path).read_text()), self.output_dir / "training_curves.png"
            )
        triage = report["triage"]
        logger.info(
            "evaluation on %d images: auc_macro %s, accuracy %.4f, balanced_accuracy %.4f (argmax: %.4f, %.4f), "
            "ECE %.4f; triage: malignant AUC %s, refer at %s: sensitivity %s, specificity %s; wrote %s",
            report["n_images"],
            _fmt(report["auc_macro"]),
            report["accuracy"],
            report["balanced_accuracy"],
            report["accuracy_argmax"],
            report["balanced_accuracy_argmax"],
            report["expected_calibration_error"],
            _fmt(triage["malignant_auc"]),
            _fmt(triage["threshold"]),
            _fmt(triage["sensitivity"]),
            _fmt(triage["specificity"]),
            self.output_dir / "metrics.json",
        )

    def _guard_report(
        self,
        scores: np.ndarray,
        thresholds: np.ndarray,
        labels: np.ndarray,
        logits: np.ndarray,
        features: np.ndarray | None,
    ) -> dict:
        """The served guard on these in-distribution images: its thresholds, the share flagged (in all and per
        class) and the score's quantiles; with ``ckpt_path`` and the features, the share each method would flag
        (with the served kind of threshold)."""
        flagged = scores > thresholds
        overflagged = ood.overflagged(flagged, labels, self.class_names, self.guard.target_share)
        if overflagged:
            logger.warning(
                "the out-of-distribution guard (%s) flags %s: these lesions would go unanswered, against %.0f%% "
                "targeted (eval/metrics.json 'ood'; docs/RESULTS.md says what a weak network does to rare classes)",
                self.guard.method,
                ", ".join(f"{v['share']:.0%} of the {v['n']} {name} images" for name, v in overflagged.items()),
                100 * (1 - self.guard.target_share),
            )
        by_class = self.guard.class_thresholds
        report = {
            "method": self.guard.method,
            "threshold": self.guard.threshold,
            "class_thresholds": None if by_class is None else dict(zip(self.class_names, by_class, strict=True)),
            "target_share": self.guard.target_share,
            "flagged_share": ood.flagged_shares(flagged, labels, self.class_names),
            "overflagged_classes": overflagged,
            "score_quantiles": {f"{q:g}": float(np.quantile(scores, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)},
            "note": "the classification metrics above count every image, flagged or not",
        }
        if self.ckpt_path and features is not None:
            block, statistics = ood.load_fit(self.ckpt_path)
            report["statistics_split"] = ood.statistics_split(block)
            logits = torch.as_tensor(logits)
            every = ood.all_scores(logits, torch.as_tensor(features), statistics)
            served = ood.served_thresholds(block, by_class is not None, logits)
            report["flagged_share_by_method"] = {
                method: ood.flagged_shares(every[method] > served[method], labels, self.class_names)
                for method in ood.METHODS
            }
        return report


def output_rows(output: dict | list[dict], key: str) -> torch.Tensor | None:
    """``key`` of an evaluator's iteration output as one (N, ...) tensor on the CPU (None where absent): the
    batch's own when the evaluator does not decollate (train.json's), else its images' stacked."""
    if isinstance(output, dict):
        value = output.get(key)
        return None if value is None else torch.as_tensor(value).detach().cpu()
    values = [torch.as_tensor(item[key]).detach().cpu() for item in output if item.get(key) is not None]
    return torch.stack(values) if values else None


def _image_names(output: dict | list[dict], batch: dict | list[dict]) -> list[str]:
    """The batch's image files: the cached fast path names them in the batch, the per-sample chain in the
    images' metadata (as a batch, or per image when the evaluator decollates)."""
    if isinstance(batch, dict):
        names = batch["image_path"] if "image_path" in batch else output["image"].meta["filename_or_obj"]
        return [str(name) for name in names]
    return [
        str(item["image_path"]) if "image_path" in item else str(o["image"].meta["filename_or_obj"])
        for o, item in zip(output, batch, strict=True)
    ]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
