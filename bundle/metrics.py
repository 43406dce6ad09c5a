"""Classification metrics over a whole evaluation set, computed once at its end.

ROC AUC comes from MONAI (``compute_roc_auc``); the rest are a few lines of numpy. A class with
no positive (or no negative) example has no AUC: it is reported as ``None`` and left out of the
macro average, which says over how many classes it was taken.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc


def per_class_auc(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    aucs = []
    for c in range(num_classes):
        positives = labels == c
        if positives.all() or not positives.any():
            aucs.append(None)
            continue
        auc = compute_roc_auc(torch.as_tensor(probabilities[:, c]), torch.as_tensor(positives.astype(np.int64)))
        aucs.append(float(auc))
    return aucs


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are the true class, columns the predicted one."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``labels``."""
    cm = confusion_matrix(np.asarray(labels), np.asarray(predicted), num_classes)
    support = cm.sum(axis=1)
    return float(np.mean([cm[c, c] / support[c] for c in range(num_classes) if support[c]]))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over confidence bins (``reliability_bins``)."""
    bins = reliability_bins(probabilities, labels, n_bins)
    return float(sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in bins) / len(labels))


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class): what temperature scaling minimises."""
    p_true = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p_true, 1e-12, None)).mean())


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Per confidence bin (top-label): mean confidence, accuracy and image count; the ECE's terms."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    return [
        {
            "lower": b / n_bins,
            "confidence": float(confidence[bins == b].mean()),
            "accuracy": float(correct[bins == b].mean()),
            "count": int((bins == b).sum()),
        }
        for b in np.unique(bins)
    ]


def operating_points(
    probabilities: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    class_names: Sequence[str],
    sensitivities: Sequence[float] = (0.90, 0.95),
) -> dict:
    """Per class, one-vs-rest: sensitivity, specificity and PPV of the served decision, and the
    probability threshold (with its specificity) that reaches each of ``sensitivities``: what a
    triage setting would pick, e.g. flagging melanoma at 95% sensitivity."""
    points = {}
    for c, name in enumerate(class_names):
        positives = labels == c
        if positives.all() or not positives.any():
            points[name] = None
            continue
        flagged = predicted == c
        tp, fp = int((flagged & positives).sum()), int((flagged & ~positives).sum())
        entry = {
            "decision": {
                "sensitivity": tp / int(positives.sum()),
                "specificity": 1 - fp / int((~positives).sum()),
                "ppv": tp / (tp + fp) if tp + fp else None,
            }
        }
        scores = probabilities[:, c]
        for target in sensitivities:
            threshold = threshold_at_sensitivity(scores, positives, target)
            flagged = scores >= threshold
            entry[f"at_sensitivity_{target:.2f}"] = {
                "threshold": threshold,
                "sensitivity": float(flagged[positives].mean()),
                "specificity": float(1 - flagged[~positives].mean()),
            }
        points[name] = entry
    return points


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for the boolean ``positives``; None without both positives and negatives."""
    positives = np.asarray(positives, dtype=bool)
    if positives.all() or not positives.any():
        return None
    return float(compute_roc_auc(torch.as_tensor(np.asarray(scores, dtype=np.float64)), torch.as_tensor(positives)))


def binary_operating_point(scores: np.ndarray, positives: np.ndarray, threshold: float | None) -> dict:
    """Sensitivity, specificity, PPV and NPV of flagging ``scores >= threshold`` against the boolean
    ``positives``, with the counts of each; a rate whose denominator is zero, or every rate when
    ``threshold`` is None, is None."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    n_positive, n_negative = int(positives.sum()), int((~positives).sum())
    point = {"sensitivity": None, "specificity": None, "ppv": None, "npv": None}
    if threshold is not None:
        flagged = scores >= threshold
        tp, fp = int((flagged & positives).sum()), int((flagged & ~positives).sum())
        fn, tn = n_positive - tp, n_negative - fp
        point = {
            "sensitivity": tp / n_positive if n_positive else None,
            "specificity": tn / n_negative if n_negative else None,
            "ppv": tp / (tp + fp) if tp + fp else None,
            "npv": tn / (tn + fn) if tn + fn else None,
        }
    return {**point, "n_positive": n_positive, "n_negative": n_negative}


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, for plotting."""
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order].astype(np.float64)
    last_of_each_threshold = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(positives)[last_of_each_threshold]
    fp = (last_of_each_threshold + 1) - tp
    tpr = np.r_[0.0, tp / max(positives.sum(), 1)]
    fpr = np.r_[0.0, fp / max(positives.size - positives.sum(), 1)]
    return fpr, tpr


def classification_report(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str], predicted: np.ndarray | None = None
) -> dict:
    """Everything ``eval/metrics.json`` holds, from (N, C) probabilities and (N,) integer labels.

    The class metrics are those of ``predicted`` (the decision rule's classes), by default the argmax.
    """
    num_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes or len(labels) != len(probabilities):
        raise ValueError(f"expected ({len(labels)}, {num_classes}) probabilities, got {probabilities.shape}")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics over zero images")
    predicted = probabilities.argmax(axis=1) if predicted is None else np.asarray(predicted)
    cm = confusion_matrix(labels, predicted, num_classes)
    support = cm.sum(axis=1)
    recall = [float(cm[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    predicted_counts = cm.sum(axis=0)
    precision = [float(cm[c, c] / predicted_counts[c]) if predicted_counts[c] else None for c in range(num_classes)]
    aucs = per_class_auc(probabilities, labels, num_classes)
    defined_aucs = [a for a in aucs if a is not None]
    present_recalls = [r for r in recall if r is not None]
    return {
        "n_images": int(len(labels)),
        "auc_macro": float(np.mean(defined_aucs)) if defined_aucs else None,
        "auc_macro_n_classes": len(defined_aucs),
        "auc_per_class": dict(zip(class_names, aucs, strict=True)),
        "accuracy": float(np.trace(cm) / cm.sum()),
        "balanced_accuracy": float(np.mean(present_recalls)),
        "recall_per_class": dict(zip(class_names, recall, strict=True)),
        "precision_per_class": dict(zip(class_names, precision, strict=True)),
        "support_per_class": dict(zip(class_names, support.tolist(), strict=True)),
        "expected_calibration_error": expected_calibration_error(probabilities, labels),
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
        "operating_points": operating_points(probabilities, labels, predicted, class_names),
    }


def threshold_at_sensitivity(scores: np.ndarray, positives: np.ndarray, target: float) -> float | None:
    """The highest threshold ``t`` whose sensitivity (the share of positives scoring ``>= t``) reaches
    ``target``; None without positives. That is the k-th highest positive score, k = ceil(target * n): any higher
    threshold misses that image. Ties at it are all flagged, which can only raise the sensitivity."""
    ranked = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(positives, dtype=bool)])[::-1]
    if ranked.size == 0:
        return None
    k = max(1, math.ceil(target * ranked.size - 1e-9))  # -1e-9: 0.9 * 10 is 9.000000000000002 in floating point
    return float(ranked[k - 1])
