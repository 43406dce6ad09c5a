"""PNG plots written next to ``eval/metrics.json``: what people would rather look at than read."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bundle.metrics import expected_calibration_error, reliability_bins, roc_curve  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc_curves(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str], aucs: Sequence[float | None], path: Path
) -> None:
    fig, ax = plt.subplots(figsize=(6, 6))
    for c, (name, auc) in enumerate(zip(class_names, aucs, strict=True)):
        if auc is None:
            continue
        fpr, tpr = roc_curve(probabilities[:, c], labels == c)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f}, n={int((labels == c).sum())})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC curve per class",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_malignant_roc(malignant: np.ndarray, is_malignant: np.ndarray, triage: dict, path: Path) -> None:
    """The triage answer's ROC: malignant (akiec + bcc + mel) against benign by the malignant probability,
    with the operating point of the refer threshold fitted on validation marked (``triage``: the
    ``triage`` block of metrics.json)."""
    fig, ax = plt.subplots(figsize=(6, 6))
    classes = "+".join(triage["malignant_classes"])
    if triage["malignant_auc"] is not None:
        fpr, tpr = roc_curve(malignant, is_malignant)
        ax.plot(
            fpr,
            tpr,
            color="tab:red",
            label=f"{classes} vs rest (AUC {triage['malignant_auc']:.3f}, "
            f"n={triage['n_malignant']} malignant, {triage['n_benign']} benign)",
        )
    if triage["sensitivity"] is not None and triage["specificity"] is not None:
        ax.plot(
            [1 - triage["specificity"]],
            [triage["sensitivity"]],
            marker="o",
            markersize=9,
            color="black",
            linestyle="none",
            label=f"refer at p >= {triage['threshold']:.3f} (fitted on validation for "
            f"{triage['target_sensitivity']:.0%} sensitivity): sensitivity {triage['sensitivity']:.3f}, "
            f"specificity {triage['specificity']:.3f}",
        )
    ax.axhline(triage["target_sensitivity"], color="grey", linestyle=":", linewidth=1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set(
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        title="Malignant vs benign: the refer answer",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> None:
    """Rows normalised to recall (colour), with raw counts written in each cell."""
    counts = np.asarray(matrix)
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if recall[i, j] > 0.5 else "black", fontsize=9)
    ticks = range(len(class_names))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (colour: row recall)",
    )
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_training_curves(history: Sequence[dict], path: Path) -> None:
    """Training loss and every validation metric recorded per epoch (see TrainingHistory)."""
    epochs = [h["epoch"] for h in history]
    val_keys = sorted({k for h in history for k in h if k.startswith("val_")})
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker=".")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in val_keys:
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            val_ax.plot(*zip(*points, strict=True), marker=".", label=key)
    val_ax.set(xlabel="epoch", title="validation")
    if val_keys:
        val_ax.legend()
    _save(fig, path)


def plot_reliability(
    probabilities: np.ndarray,
    labels: np.ndarray,
    path: Path,
    uncalibrated: np.ndarray | None = None,
    temperature: float = 1.0,
) -> None:
    """Reliability diagram: accuracy against confidence per bin (the diagonal is perfect calibration),
    the served probabilities, and the network's raw softmax when given, with each one's ECE."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    series = [
        ("softmax", uncalibrated, "tab:orange"),
        (f"served (temperature {temperature:.2f})", probabilities, "tab:blue"),
    ]
    for name, p, colour in series:
        if p is None:
            continue
        bins = reliability_bins(p, labels)
        ece = expected_calibration_error(p, labels)
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            color=colour,
            label=f"{name}: ECE {ece:.3f}",
        )
        hist.hist(p.max(axis=1), bins=15, range=(0, 1), alpha=0.5, color=colour)
    ax.set(ylabel="accuracy", title="Reliability (top-label confidence)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="confidence", ylabel="images")
    _save(fig, path)


def plot_ood_scores(
    scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], report: dict, path: Path
) -> None:
    """The out-of-distribution score of the evaluated (in-distribution) images, one box per class, with the
    threshold fitted on validation and the share of each class it flags (``report``: metrics.json's ``ood``)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    present = [c for c in range(len(class_names)) if (labels == c).any()]
    shares = report["flagged_share"]["per_class"]
    ax.boxplot([scores[labels == c] for c in present], whis=(1, 99), showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(
        range(1, len(present) + 1),
        [f"{class_names[c]}\nn={int((labels == c).sum())}\n{shares[class_names[c]]:.1%} flagged" for c in present],
        fontsize=8,
    )
    by_class = report.get("class_thresholds")
    one = f"threshold ({report['method']}, keeps {report['target_share']:.0%} of validation)"
    flagged = f"{report['flagged_share']['all']:.1%} of these flagged"
    ax.axhline(
        report["threshold"], color="tab:red", linestyle="--", label=f"one {one}" if by_class else f"{one}: {flagged}"
    )
    if by_class:  # an image's threshold is that of its most probable class, drawn over the box of that class
        ax.hlines(
            [by_class[class_names[c]] for c in present],
            [x + 0.6 for x in range(len(present))],
            [x + 1.4 for x in range(len(present))],
            color="tab:red",
            label=f"class thresholds (an image gets that of its most probable class): {flagged}",
        )
    ax.set(ylabel=f"{report['method']} score (higher: less like training)", title="Out-of-distribution score")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
