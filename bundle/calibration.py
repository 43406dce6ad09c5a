"""Calibrated probabilities and a balanced decision rule, both fitted on the validation split.

A network trained with class re-balancing and label smoothing ranks lesions well but its softmax is
not a probability a person can read at face value, and its argmax favours whatever class mix it was
trained on. Two small fits on the validation predictions of the saved model fix that:

- **Temperature scaling** (Guo et al., 2017): one scalar ``T`` dividing the logits, fitted by
  minimising the validation negative log-likelihood. It changes no ranking (so no AUC), only how
  confident the probabilities are.
- **Decision rule for balanced accuracy**: the class is ``argmax(log p + bias)``, with
  ``bias = -tau * log(prior)``, ``prior`` the model's mean predicted probability per class on
  validation (the class mix it has learnt to expect) and ``tau`` chosen on validation to maximise
  balanced accuracy. ``tau = 1`` is the textbook correction that makes every class equally likely a
  priori; fitting one scalar rather than a bias per class keeps the rule from overfitting the
  validation split's rarest classes (about 20 dermatofibromas).
- **Triage threshold**: the malignant probability of an image is the sum of the calibrated
  probabilities of the malignant classes (``MALIGNANT_CLASSES``: akiec, bcc, mel); an image is
  referred when it reaches ``refer_threshold``, the largest threshold whose validation sensitivity to
  malignant lesions is at least ``TARGET_SENSITIVITY`` (``fit_refer_threshold``).

Serving picks the class by one of ``DECISION_RULES``: ``balanced`` (the rule above) or ``argmax`` (the
most probable class), the config key ``decision_rule``; a model whose sidecar holds no fitted rule is
served by argmax, and says so. A sidecar without a ``refer_threshold`` (an older model) serves no
referral (``refer`` None) rather than a guessed one.

All of it lives in the weights' sidecar (``bundle.sidecar``), written by ``BestModelSaver`` whenever it
saves a better model; evaluation, batch inference and every server read them back through
``Calibration.from_sidecar``, so they all give the same probabilities and the same class.
"""

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from bundle.labels import CLASS_NAMES, MALIGNANT_CLASSES
from bundle.metrics import (
    balanced_accuracy,
    binary_auc,
    binary_operating_point,
    expected_calibration_error,
    negative_log_likelihood,
    threshold_at_sensitivity,
)
from bundle.sidecar import read_sidecar, sidecar_path

TAU_GRID = np.round(np.arange(0.0, 2.0001, 0.05), 2)

MALIGNANT_INDICES = tuple(CLASS_NAMES.index(name) for name in MALIGNANT_CLASSES)
# The share of validation malignant lesions the refer threshold must catch.
TARGET_SENSITIVITY = 0.95
# How the served class is chosen (config key ``decision_rule``).
DECISION_RULES = ("balanced", "argmax")


def check_decision_rule(value: str) -> str:
    """``value`` if it is one of ``DECISION_RULES``, else an error naming the config key."""
    if value not in DECISION_RULES:
        raise ValueError(f"config key 'decision_rule' must be one of {list(DECISION_RULES)}, got {value!r}")
    return value


def malignant_probability(probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
    """The summed probability of ``MALIGNANT_CLASSES`` for each row of (N, 7) or (7,) class probabilities
    (columns in ``CLASS_NAMES`` order, as every loader checks), in float64."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape[-1] != len(CLASS_NAMES):
        raise ValueError(f"expected probabilities over the {len(CLASS_NAMES)} classes, got shape {p.shape}")
    return p[..., list(MALIGNANT_INDICES)].sum(axis=-1)


@dataclass(frozen=True)
class Calibration:
    """How logits become served probabilities (``temperature``), a class (``class_bias``: the balanced
    rule; None: the argmax) and a referral (``refer_threshold`` on the malignant probability; None: none)."""

    temperature: float = 1.0
    class_bias: tuple[float, ...] | None = None
    fit: dict = field(default_factory=dict)  # what the fit measured on validation, for the record
    refer_threshold: float | None = None

    @property
    def decision_rule(self) -> str:
        """The rule ``decide`` applies: ``balanced`` with a fitted class bias, else ``argmax``."""
        return "argmax" if self.class_bias is None else "balanced"

    def refer(self, malignant: float | np.ndarray) -> bool | np.ndarray | None:
        """Whether a malignant probability reaches the refer threshold; None without a fitted threshold."""
        if self.refer_threshold is None:
            return None
        flagged = np.asarray(malignant) >= self.refer_threshold
        return bool(flagged) if flagged.ndim == 0 else flagged

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of ``logits / temperature`` over the last axis."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def decide(self, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
        """The class index of each row of ``probabilities`` under the decision rule."""
        p = np.asarray(probabilities, dtype=np.float64)
        scores = np.log(np.clip(p, 1e-12, None))
        if self.class_bias is not None:
            scores = scores + np.asarray(self.class_bias)
        return scores.argmax(axis=-1)

    def to_json(self) -> dict:
        record = asdict(self)
        record["class_bias"] = None if self.class_bias is None else list(self.class_bias)
        return record

    @classmethod
    def from_sidecar(cls, weights: str | os.PathLike, decision_rule: str = "balanced") -> "Calibration":
        """The calibration stored beside ``weights``; none stored (an older model) is the identity.

        ``decision_rule`` ``argmax`` drops the stored class bias, so the served class is the most
        probable one; the temperature and the refer threshold still apply. A stored ``refer_threshold``
        must be a number in [0, 1] (or null: none fitted); a sidecar without one serves no referral.
        """
        check_decision_rule(decision_rule)
        record = (read_sidecar(weights) or {}).get("calibration")
        if record is None:
            return cls()
        try:
            temperature = float(record["temperature"])
            bias = record.get("class_bias")
            bias = None if bias is None else tuple(float(b) for b in bias)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{sidecar_path(weights)}: 'calibration' must hold a 'temperature' and a "
                f"'class_bias' list: {type(error).__name__}: {error}"
            ) from None
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{sidecar_path(weights)}: calibration temperature must be positive, got {temperature}")
        threshold = record.get("refer_threshold")
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not (math.isfinite(threshold) and 0 <= threshold <= 1)
        ):
            raise ValueError(
                f"{sidecar_path(weights)}: 'calibration' key 'refer_threshold' must be a probability in [0, 1] "
                f"(or null: none fitted), got {threshold!r}"
            )
        if decision_rule == "argmax":
            bias = None
        return cls(temperature, bias, dict(record.get("fit", {})), None if threshold is None else float(threshold))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` under softmax(logits / T)."""
    logits, labels = logits.detach().double(), labels.detach().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fit_decision_rule(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[list[float], float]:
    """``(class_bias, tau)`` maximising balanced accuracy on (validation) ``probabilities`` over ``TAU_GRID``.

    Ties go to the smallest tau: the rule stays as close to the plain argmax as the data allow.
    """
    prior = np.clip(probabilities.mean(axis=0), 1e-6, None)
    best_tau, best_score = 0.0, -1.0
    for tau in TAU_GRID:
        rule = Calibration(class_bias=tuple(-tau * np.log(prior)))
        score = balanced_accuracy(labels, rule.decide(probabilities), num_classes)
        if score > best_score + 1e-9:
            best_tau, best_score = float(tau), score
    return [float(b) for b in -best_tau * np.log(prior)], best_tau


def fit_refer_threshold(
    malignant: np.ndarray, is_malignant: np.ndarray, target: float = TARGET_SENSITIVITY
) -> float | None:
    """The largest threshold ``t`` on (validation) malignant probabilities such that the share of malignant
    images with ``malignant >= t`` is at least ``target``; None when there is no malignant image to fit on.

    That is the k-th highest malignant image's score, k = ceil(target * n_malignant): any higher threshold
    misses that image and so falls below the target. Images tied at that score are all referred (``>=``),
    so ties can only raise the sensitivity above the target, never lower it.
    """
    return threshold_at_sensitivity(malignant, is_malignant, target)


def triage_report(probabilities: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict:
    """The triage answer on labelled images (eval/metrics.json's ``triage``): the refer ``threshold``
    (fitted on validation) and its sensitivity, specificity, PPV and NPV for malignant lesions on these
    images (None where undefined, or without a threshold), and the malignant-vs-benign ROC AUC of the
    malignant probability."""
    malignant = malignant_probability(probabilities)
    is_malignant = np.isin(np.asarray(labels), MALIGNANT_INDICES)
    point = binary_operating_point(malignant, is_malignant, threshold)
    return {
        "threshold": threshold,
        "target_sensitivity": TARGET_SENSITIVITY,
        "sensitivity": point["sensitivity"],
        "specificity": point["specificity"],
        "ppv": point["ppv"],
        "npv": point["npv"],
        "malignant_auc": binary_auc(malignant, is_malignant),
        "n_malignant": point["n_positive"],
        "n_benign": point["n_negative"],
        "malignant_classes": list(MALIGNANT_CLASSES),
    }


def fit(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Calibration:
    """Temperature, decision rule and (with the 7 HAM10000 classes) the refer threshold from validation
    ``logits`` (N, C) and integer ``labels`` (N,)."""
    labels_np = labels.cpu().numpy().astype(np.int64)
    before = torch.softmax(logits.float(), -1).numpy()
    temperature = fit_temperature(logits, labels)
    after = Calibration(temperature).probabilities(logits).numpy()
    class_bias, tau = fit_decision_rule(after, labels_np, num_classes)
    rule = Calibration(temperature, tuple(class_bias))
    threshold, triage = None, None
    if num_classes == len(CLASS_NAMES):  # the malignant classes are named in the serving class order
        threshold = fit_refer_threshold(malignant_probability(after), np.isin(labels_np, MALIGNANT_INDICES))
        triage = triage_report(after, labels_np, threshold)
    record = {
        "n_images": int(len(labels_np)),
        "nll_before": negative_log_likelihood(before, labels_np),
        "nll_after": negative_log_likelihood(after, labels_np),
        "ece_before": expected_calibration_error(before, labels_np),
        "ece_after": expected_calibration_error(after, labels_np),
        "tau": tau,
        "balanced_accuracy_argmax": balanced_accuracy(labels_np, after.argmax(1), num_classes),
        "balanced_accuracy_rule": balanced_accuracy(labels_np, rule.decide(after), num_classes),
    }
    if triage is not None:
        record["triage"] = triage
    return Calibration(temperature, tuple(class_bias), record, threshold)


class CalibratedSoftmaxd(MapTransform):
    """Postprocessing: logits under ``keys`` -> calibrated class probabilities (float32)."""

    def __init__(self, keys: KeysCollection, calibration: Calibration | None = None) -> None:
        super().__init__(keys)
        self.calibration = calibration or Calibration()

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.calibration.probabilities(torch.as_tensor(d[key]))
        return d
