"""Train and evaluate named recipe variants on one dataset, several at once if asked, and tabulate every run.

    python scripts/run_recipes.py --dataset_dir D --work_dir W \
        --runs '{"ham64": {"config": ["configs/train_ham10000.json"], "image_size": [64, 64]}, ...}' \
        [--seeds "[0,1,2]"] [--parallel 4] [--alone_first true] [--timeout_s 600]

Each run is ``monai.bundle run`` of ``configs/train.json`` (plus the run's ``config`` overlays) and
then of ``evaluate.json`` on top, with the run's other keys as command-line overrides, in
``<work_dir>/<name>`` (cache shared in ``<work_dir>/cache``). One lesion-level datalist
(``<work_dir>/datalist.json``, seed 0) serves every run, so they all see the same test split; model
selection and the calibration fit read only the validation split, and the test split is read once
per run, by its evaluation. Each finished run appends one JSON line to ``<work_dir>/runs.jsonl``
(config, resolution, epochs, device, wall times, training img/s, validation and test metrics, the
triage operating point) and the table of all of them is printed as Markdown, ready for
docs/RESULTS.md, followed by the mean ± standard deviation of each variant over its seeds. A failing
run is reported and the others go on.

``seeds`` turns each run into one run per seed (``<name>_s<seed>``, the ``seed`` key), all on the
same split. ``parallel`` N runs N processes at once (on one GPU they share it: a run that leaves the
GPU idle between launches leaves room for the others); with ``alone_first`` the first run goes alone
before the others start, so that the summary compares the summed training img/s of N runs side by
side with one run's alone (``<work_dir>/parallel.json``).
"""

import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import torch

from bundle import data
from bundle.flags import as_bool

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
        "test_triage": metrics.get("triage"),
        "train_img_per_s": _steady_img_per_s(history),
        "device_peak_gib": max((row.get("device_peak_gib") or 0 for row in history), default=0) or None,
        "val_auc_by_epoch": [round(v, 4) for v in val_auc],
    }


def _steady_img_per_s(history: list[dict]) -> float | None:
    """Training img/s over the epochs after the first (which pays the warm-up: cuDNN tuning, graph capture)."""
    rows = [row for row in history[1:] if row.get("train_s")]
    if not rows:
        return None
    return sum(row["train_img_per_s"] * row["train_s"] for row in rows) / sum(row["train_s"] for row in rows)


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


SUMMARY_KEYS = {
    "val AUC": "val_auc_best",
    "val bal. acc": "val_balanced_accuracy",
    "test AUC": "test_auc",
    "test bal. acc": "test_balanced_accuracy",
    "test bal. acc argmax": "test_balanced_accuracy_argmax",
    "test acc": "test_accuracy",
    "test ECE": "test_ece",
}
TRIAGE_KEYS = {"refer sens.": "sensitivity", "refer spec.": "specificity", "malignant AUC": "malignant_auc"}


def _variant(row: dict) -> str:
    """A run's name without its seed suffix: the rows of one variant over seeds."""
    name, _, seed = row["name"].rpartition("_s")
    return name if name and seed.isdigit() else row["name"]


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def seed_summary(rows: list[dict]) -> str:
    """Markdown: each variant's mean ± sample standard deviation over its runs (seeds)."""
    variants: dict[str, list[dict]] = {}
    for row in rows:
        variants.setdefault(_variant(row), []).append(row)
    head = ["variant", "runs", *SUMMARY_KEYS, *TRIAGE_KEYS, "train img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, group in variants.items():
        cells = [name, str(len(group))]
        cells += [_mean_sd([r.get(key) for r in group]) for key in SUMMARY_KEYS.values()]
        cells += [_mean_sd([(r.get("test_triage") or {}).get(key) for r in group]) for key in TRIAGE_KEYS.values()]
        speeds = [r.get("train_img_per_s") for r in group if r.get("train_img_per_s")]
        cells.append(f"{statistics.mean(speeds):.0f}" if speeds else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def expand_seeds(runs: dict, seeds: list[int] | None) -> dict:
    """Each run once per seed, named ``<name>_s<seed>``; ``seeds`` None keeps ``runs`` as they are."""
    if not seeds:
        return {name: dict(options) for name, options in runs.items()}
    return {f"{name}_s{seed}": {**options, "seed": seed} for name, options in runs.items() for seed in seeds}


def main(
    dataset_dir: str,
    work_dir: str,
    runs: dict,
    timeout_s: float | None = None,
    seeds: list[int] | None = None,
    parallel: int = 1,
    alone_first: bool = False,
    cache_dir: str | None = None,
) -> None:
    """Run every entry of ``runs`` (name -> overrides, with an optional ``config`` list of overlays);
    the image caches go to ``cache_dir`` (default ``<work_dir>/cache``)."""
    alone_first = as_bool(alone_first, "--alone_first")
    if int(parallel) < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    datalist = work / "datalist.json"
    if not datalist.is_file():
        data.write_datalist(data.split_by_lesion(data.read_ham10000(dataset_dir), seed=0), datalist, dataset_dir)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (2 cores)"
    results = work / "runs.jsonl"
    cache = Path(cache_dir).resolve() if cache_dir else work / "cache"
    lock = threading.Lock()

    def run_one(name: str, options: dict) -> dict | None:
        configs = ["configs/train.json", *options.get("config", [])]
        common = [
            "--dataset_dir",
            str(dataset_dir),
            "--datalist",
            str(datalist),
            "--bundle_root",
            str(work / name),
            "--cache_dir",
            str(cache),
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
            return None
        with lock, open(results, "a") as out:
            out.write(json.dumps(row) + "\n")
            print(markdown([row]).splitlines()[-1], flush=True)
        return row

    todo = list(expand_seeds(runs, seeds).items())
    alone = run_one(*todo.pop(0)) if alone_first and todo else None
    parallel = _memory_bound(int(parallel), alone)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=int(parallel)) as pool:
        together = [row for row in pool.map(lambda item: run_one(*item), todo) if row is not None]
    if alone_first and together:
        _parallel_summary(work, int(parallel), alone, together, time.perf_counter() - started)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    print(markdown(rows))
    print()
    print(seed_summary(rows))


def _memory_bound(parallel: int, alone: dict | None) -> int:
    """``parallel``, lowered to as many runs as the GPU's memory holds (80% of it, with a 10% margin on
    the run alone's peak)."""
    peak = alone and alone.get("device_peak_gib")
    if not peak or not torch.cuda.is_available():
        return parallel
    fits = max(1, int(0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30 / (1.1 * peak)))
    if fits < parallel:
        print(f"parallel {parallel} lowered to {fits}: a run alone peaked at {peak:.1f} GiB of the GPU", flush=True)
    return min(parallel, fits)


def _parallel_summary(work: Path, parallel: int, alone: dict | None, together: list[dict], wall_s: float) -> None:
    """``parallel.json``: the summed steady training img/s of the first ``parallel`` runs that went together
    against the run alone, and the wall time of all of them against that of one alone."""
    group = together[:parallel]
    summed = sum(row["train_img_per_s"] or 0 for row in group)
    report = {
        "parallel": parallel,
        "runs_together": len(together),
        "summed_img_per_s": summed,
        "alone_img_per_s": alone and alone["train_img_per_s"],
        "speedup_vs_alone": alone and alone["train_img_per_s"] and summed / alone["train_img_per_s"],
        "alone_train_wall_s": alone and alone["train_wall_s"],
        "together_wall_s": wall_s,
    }
    (work / "parallel.json").write_text(json.dumps(report, indent=1))
    print("parallel: " + json.dumps(report), flush=True)


if __name__ == "__main__":
    fire.Fire(main)
