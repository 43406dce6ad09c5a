"""Train and evaluate named recipe variants on one dataset, and tabulate every run.

    python scripts/run_recipes.py --dataset_dir D --work_dir W \
        --runs '{"ham64": {"config": ["configs/train_ham10000.json"], "image_size": [64, 64]}, ...}'

Each run is ``monai.bundle run`` of ``configs/train.json`` (plus the run's ``config`` overlays) and
then of ``evaluate.json`` on top, with the run's other keys as command-line overrides, in
``<work_dir>/<name>`` (cache shared in ``<work_dir>/cache``). One lesion-level datalist
(``<work_dir>/datalist.json``, seed 0) serves every run, so they all see the same test split; model
selection and the calibration fit read only the validation split, and the test split is read once
per run, by its evaluation. Each finished run appends one JSON line to ``<work_dir>/runs.jsonl``
(config, resolution, epochs, device, wall times, validation and test metrics) and the table of all
of them is printed as Markdown, ready for docs/RESULTS.md. A failing run is reported and the others go on.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch

from bundle import data

REPO = Path(__file__).resolve().parents[1]

BUNDLE_RUN = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]


def _config_list(files: list[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def _overrides(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)]
    return args


def _run(command: list[str], log: Path, timeout: float | None) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout)
    return time.perf_counter() - started


def _summary(name: str, options: dict, run_dir: Path, train_s: float, evaluate_s: float, device: str) -> dict:
    history = json.loads((run_dir / "models" / "history.json").read_text())
    sidecar = json.loads((run_dir / "models" / "model.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    val_auc = [row["val_auc"] for row in history if "val_auc" in row]
    fit = sidecar.get("calibration", {}).get("fit", {})
    calibration = metrics.get("calibration", {})
    return {
        "name": name,
        "options": options,
        "device": device,
        "image_size": sidecar["image_size"],
        "epochs": len(history),
        "train_wall_s": round(train_s, 1),
        "evaluate_wall_s": round(evaluate_s, 1),
        "val_auc_best": max(val_auc),
        "val_best_epoch": sidecar["epoch"],
        "val_auc_last5_mean": sum(val_auc[-5:]) / len(val_auc[-5:]),
        "val_balanced_accuracy": fit.get("balanced_accuracy_rule"),
        "val_ece": fit.get("ece_after"),
        "temperature": calibration.get("temperature"),
        "tau": fit.get("tau"),
        "test_auc": metrics["auc_macro"],
        "test_balanced_accuracy": metrics["balanced_accuracy"],
        "test_balanced_accuracy_argmax": metrics.get("balanced_accuracy_argmax"),
        "test_accuracy": metrics["accuracy"],
        "test_ece": metrics["expected_calibration_error"],
        "test_ece_before": calibration.get("expected_calibration_error_before"),
        "test_recall": metrics["recall_per_class"],
        "val_auc_by_epoch": [round(v, 4) for v in val_auc],
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| run | config | size | epochs | device | train wall | val AUC best (epoch) / last-5 mean | "
        "val bal. acc | test AUC | test bal. acc (argmax) | test acc | test ECE (before) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        options = {k: v for k, v in r["options"].items() if k != "config"}
        config = " + ".join(Path(c).name for c in ["train.json", *r["options"].get("config", [])])
        if options:
            config += " " + " ".join(f"--{k} {json.dumps(v)}" for k, v in options.items() if k != "image_size")
        lines.append(
            f"| {r['name']} | {config} | {r['image_size'][0]}x{r['image_size'][1]} | {r['epochs']} | {r['device']} "
            f"| {r['train_wall_s']:.0f} s | {r['val_auc_best']:.3f} ({r['val_best_epoch']}) / "
            f"{r['val_auc_last5_mean']:.3f} | {r['val_balanced_accuracy']:.3f} | {r['test_auc']:.3f} "
            f"| {r['test_balanced_accuracy']:.3f} ({r['test_balanced_accuracy_argmax']:.3f}) "
            f"| {r['test_accuracy']:.3f} "
            f"| {r['test_ece']:.3f} ({r['test_ece_before']:.3f}) |"
        )
    return "\n".join(lines)


def main(dataset_dir: str, work_dir: str, runs: dict, timeout_s: float | None = None) -> None:
    """Run every entry of ``runs`` (name -> overrides, with an optional ``config`` list of overlays)."""
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    datalist = work / "datalist.json"
    if not datalist.is_file():
        data.write_datalist(data.split_by_lesion(data.read_ham10000(dataset_dir), seed=0), datalist, dataset_dir)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (2 cores)"
    results = work / "runs.jsonl"
    for name, options in runs.items():
        options = dict(options)
        configs = ["configs/train.json", *options.get("config", [])]
        common = [
            "--dataset_dir",
            str(dataset_dir),
            "--datalist",
            str(datalist),
            "--bundle_root",
            str(work / name),
            "--cache_dir",
            str(work / "cache"),
            *_overrides({k: v for k, v in options.items() if k != "config"}),
        ]
        (work / name).mkdir(exist_ok=True)
        print(f"run {name}: {' '.join(common[8:])}", flush=True)
        try:
            train_s = _run(
                [*BUNDLE_RUN, _config_list(configs), "--resume", "false", *common], work / name / "train.log", timeout_s
            )
            evaluate_s = _run(
                [*BUNDLE_RUN, _config_list([*configs, "configs/evaluate.json"]), *common],
                work / name / "evaluate.log",
                timeout_s,
            )
            row = _summary(name, options, work / name, train_s, evaluate_s, device)
        except (subprocess.SubprocessError, OSError, KeyError, ValueError) as error:
            print(f"run {name} failed: {error} (logs in {work / name})", flush=True)
            continue
        with open(results, "a") as out:
            out.write(json.dumps(row) + "\n")
        print(markdown([row]).splitlines()[-1], flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    print(markdown(rows))


if __name__ == "__main__":
    fire.Fire(main)
