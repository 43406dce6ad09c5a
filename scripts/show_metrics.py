"""Print an evaluation's metrics.json as a table.

python scripts/show_metrics.py eval/metrics.json
"""

import json
import sys
from pathlib import Path

import fire


def _fmt(value) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def triage_line(t: dict) -> str:
    """The refer answer: malignant-vs-benign AUC, and the operating point of the validation threshold."""
    head = (
        f"triage ({'+'.join(t['malignant_classes'])} vs rest; {t['n_malignant']} malignant, {t['n_benign']} benign)"
        f"   malignant AUC {_fmt(t['malignant_auc'])}"
    )
    if t["threshold"] is None:
        return f"{head}   refer: no threshold in the model's sidecar (re-fit with configs/calibrate.json)"
    return (
        f"{head}   refer at malignant probability >= {t['threshold']:.4f} (fitted on validation for "
        f"{t['target_sensitivity']:.0%} sensitivity): sensitivity {_fmt(t['sensitivity'])}"
        f"  specificity {_fmt(t['specificity'])}  PPV {_fmt(t['ppv'])}  NPV {_fmt(t['npv'])}"
    )


def show(metrics_file: str = "eval/metrics.json") -> None:
    path = Path(metrics_file)
    if not path.is_file():
        sys.exit(f"no metrics at {path}: run the evaluation first (see README)")
    m = json.loads(path.read_text())
    print(
        f"{m['n_images']} images   macro ROC AUC {_fmt(m['auc_macro'])} (over {m['auc_macro_n_classes']} classes)"
        f"   accuracy {_fmt(m['accuracy'])}   balanced accuracy {_fmt(m['balanced_accuracy'])}"
        f"   ECE {_fmt(m['expected_calibration_error'])}"
    )
    if "accuracy_argmax" in m:
        rule = (m.get("decision_rule") or {}).get("rule", "balanced")
        print(
            f"decision rule ({rule}): accuracy {_fmt(m['accuracy'])}, balanced accuracy {_fmt(m['balanced_accuracy'])}"
            f"   argmax: accuracy {_fmt(m['accuracy_argmax'])}, balanced accuracy {_fmt(m['balanced_accuracy_argmax'])}"
        )
    if "triage" in m:
        print(triage_line(m["triage"]))
    print(f"{'class':<7}{'n':>6}{'AUC':>8}{'recall':>8}{'precision':>11}")
    for name in m["class_names"]:
        print(
            f"{name:<7}{m['support_per_class'][name]:>6}  {_fmt(m['auc_per_class'][name])}  "
            f"{_fmt(m['recall_per_class'][name])}     {_fmt(m['precision_per_class'][name])}"
        )
    print(f"plots: {', '.join(str(p) for p in sorted(path.parent.glob('*.png')))}")


if __name__ == "__main__":
    fire.Fire(show)
