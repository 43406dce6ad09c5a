"""The numbers in eval/metrics.json, checked on cases whose answers are known."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bundle import imbalance
from bundle.calibration import triage_report
from bundle.labels import CLASS_NAMES
from bundle.metrics import (
    binary_auc,
    binary_operating_point,
    classification_report,
    expected_calibration_error,
    operating_points,
    roc_curve,
    threshold_at_sensitivity,
)
from tests.bundle_runs import REPO

# the keys of metrics.json's "triage" block: scripts/run_recipes.py and users' tools read them
TRIAGE_KEYS = {
    "threshold",
    "target_sensitivity",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "malignant_auc",
    "n_malignant",
    "n_benign",
    "malignant_classes",
}

K = len(CLASS_NAMES)


def _one_hot_probabilities(labels, confidence=0.9):
    p = np.full((len(labels), K), (1 - confidence) / (K - 1))
    p[np.arange(len(labels)), labels] = confidence
    return p


def test_a_perfect_classifier():
    labels = np.repeat(np.arange(K), 3)
    report = classification_report(_one_hot_probabilities(labels), labels, CLASS_NAMES)
    assert report["auc_macro"] == 1 and report["accuracy"] == 1 and report["balanced_accuracy"] == 1
    assert report["confusion_matrix"] == (np.eye(K, dtype=int) * 3).tolist()
    assert report["n_images"] == 3 * K


def test_balanced_accuracy_is_the_mean_recall_not_the_accuracy():
    # 90 nv all right, 10 mel all called nv: accuracy 0.9, but only one class of two is recognised
    labels = np.array([5] * 90 + [4] * 10)
    report = classification_report(_one_hot_probabilities(np.full(100, 5)), labels, CLASS_NAMES)
    assert report["accuracy"] == pytest.approx(0.9)
    assert report["balanced_accuracy"] == pytest.approx(0.5)
    assert report["recall_per_class"]["mel"] == 0 and report["recall_per_class"]["akiec"] is None


def test_a_class_without_examples_has_no_auc_and_is_left_out_of_the_macro():
    labels = np.array([0, 0, 1, 1])
    report = classification_report(_one_hot_probabilities(labels), labels, CLASS_NAMES)
    assert report["auc_per_class"]["vasc"] is None
    assert report["auc_macro_n_classes"] == 2 and report["auc_macro"] == 1


def test_roc_curve_runs_from_origin_to_one_one():
    scores, positives = np.array([0.9, 0.8, 0.8, 0.3]), np.array([True, False, True, False])
    fpr, tpr = roc_curve(scores, positives)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(fpr) == 4  # tied scores make one threshold


def test_a_binary_operating_point_counts_by_hand():
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.2, 0.1])
    positives = np.array([True, True, True, False, False, False])
    point = binary_operating_point(scores, positives, 0.5)  # flags 0.9, 0.8 (true) and 0.7 (false)
    assert point == {
        "sensitivity": 2 / 3,
        "specificity": 2 / 3,
        "ppv": 2 / 3,
        "npv": 2 / 3,
        "n_positive": 3,
        "n_negative": 3,
    }
    assert binary_operating_point(scores, positives, 0.95)["ppv"] is None, "nothing flagged: no PPV"
    assert binary_operating_point(scores, positives, None)["sensitivity"] is None
    assert binary_auc(scores, positives) == pytest.approx(8 / 9)  # 8 of the 9 pairs ranked right
    assert binary_auc(scores, np.ones(6, bool)) is None


def test_the_triage_report_has_exactly_the_keys_the_lead_reads():
    labels = np.array([CLASS_NAMES.index(c) for c in ("mel", "bcc", "akiec", "nv", "bkl", "df", "vasc", "nv")])
    p = _one_hot_probabilities(labels)
    report = triage_report(p, labels, threshold=0.5)
    assert set(report) == TRIAGE_KEYS
    assert (report["n_malignant"], report["n_benign"], report["malignant_classes"]) == (3, 5, ["akiec", "bcc", "mel"])
    assert report["sensitivity"] == report["specificity"] == report["malignant_auc"] == 1.0
    without = triage_report(p, labels, threshold=None)
    assert without["threshold"] is None and without["sensitivity"] is None and without["malignant_auc"] == 1.0


def test_calibration_error_of_an_overconfident_classifier():
    labels = np.array([0] * 50 + [1] * 50)
    always_zero = _one_hot_probabilities(np.zeros(100, dtype=int), confidence=1.0)
    assert expected_calibration_error(always_zero, labels) == pytest.approx(0.5)


def test_loss_weights_are_inverse_frequency_and_average_one_per_image():
    items = [{"label": 0}] * 8 + [{"label": 1}] * 2
    counts = imbalance.class_counts(items, K)
    weights = imbalance.loss_weights("loss", counts)
    assert weights[:2].tolist() == pytest.approx([10 / 16, 10 / 4]) and weights[2:].sum() == 0
    assert float(sum(weights[label] * n for label, n in enumerate(counts))) == pytest.approx(len(items))
    assert imbalance.loss_weights("sampler", counts) is None


def test_the_sampler_draws_classes_about_equally():
    items = [{"label": 0}] * 900 + [{"label": 6}] * 100
    sampler = imbalance.sampler("sampler", items, seed=0)
    drawn = torch.tensor([items[i]["label"] for i in sampler])
    assert len(drawn) == len(items)
    assert (drawn == 6).float().mean() == pytest.approx(0.5, abs=0.05)


def test_an_unknown_strategy_names_the_config_key():
    with pytest.raises(ValueError, match="'imbalance'"):
        imbalance.sampler("oversample", [{"label": 0}])


def test_imbalance_power_softens_the_correction():
    items = [{"label": 0}] * 900 + [{"label": 6}] * 100
    counts = imbalance.class_counts(items, K)
    weights = imbalance.loss_weights("loss", counts, power=0.5)
    assert float(weights[6] / weights[0]) == pytest.approx(3.0)  # sqrt(900 / 100)
    assert float(sum(weights[label] * n for label, n in enumerate(counts))) == pytest.approx(len(items))
    drawn = torch.tensor([items[i]["label"] for i in imbalance.sampler("sampler", items, seed=0, power=0.5)])
    assert (drawn == 6).float().mean() == pytest.approx(0.25, abs=0.04)  # 100 x 3 of 900 + 300
    with pytest.raises(ValueError, match="'imbalance_power'"):
        imbalance.loss_weights("loss", counts, power=1.5)


def test_show_metrics_prints_both_rules_and_the_triage_line(tmp_path):
    labels = np.array([CLASS_NAMES.index(c) for c in ("mel", "bcc", "akiec", "nv", "bkl", "df", "vasc", "nv")])
    p = _one_hot_probabilities(labels)
    report = classification_report(p, labels, CLASS_NAMES)
    report |= {
        "accuracy_argmax": 1.0,
        "balanced_accuracy_argmax": 1.0,
        "decision_rule": {"rule": "balanced"},
        "triage": triage_report(p, labels, threshold=0.5),
    }
    (tmp_path / "metrics.json").write_text(json.dumps(report))
    shown = subprocess.run(
        [sys.executable, "scripts/show_metrics.py", str(tmp_path / "metrics.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert (
        "decision rule (balanced): accuracy  1.000, balanced accuracy  1.000   argmax: accuracy  1.000" in shown.stdout
    )
    assert (
        "triage (akiec+bcc+mel vs rest; 3 malignant, 5 benign)   malignant AUC  1.000   refer at malignant "
        "probability >= 0.5000 (fitted on validation for 95% sensitivity): sensitivity  1.000  specificity  1.000"
    ) in shown.stdout


@pytest.mark.parametrize("n_positives", [10, 20, 50, 100, 7])
def test_the_threshold_at_a_sensitivity_is_the_highest_that_reaches_it(n_positives):
    """Where target x positives is whole (0.9 x 10 = 9.000000000000002 in floating point), a quantile-based
    threshold took one positive more than needed, and reported 100% sensitivity at '90%'."""
    rng = np.random.default_rng(n_positives)
    scores = rng.random(n_positives + 200)
    positives = np.arange(len(scores)) < n_positives
    for target in (0.90, 0.95):
        threshold = threshold_at_sensitivity(scores, positives, target)
        sensitivity = (scores[positives] >= threshold).mean()
        above = scores[positives][scores[positives] > threshold]
        assert sensitivity >= target and (above.size == 0 or (scores[positives] >= above.min()).mean() < target)
        labels = np.where(positives, 0, 1)
        point = operating_points(np.stack([scores, 1 - scores], 1), labels, labels, ["a", "b"])["a"]
        assert point[f"at_sensitivity_{target:.2f}"]["threshold"] == threshold
    assert threshold_at_sensitivity(scores, np.zeros_like(positives), 0.9) is None
