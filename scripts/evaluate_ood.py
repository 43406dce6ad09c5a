"""Measure the out-of-distribution guard: score folders of images against the model's in-distribution test split.

    python scripts/evaluate_ood.py --dataset_dir D --datalist data/datalist.json \
        [--bundle_root .] [--weights models/model.pt] [--folders '{"mine": "path/to/folder"}'] \
        [--sets_dir ood_sets] [--builtin true] [--output eval/ood.json] [--latency_batches 20] \
        [--refit true] [--thresholds class]

Every image goes through the served path (``bundle.predictor.Predictor``: the bundle's preprocessing,
inferer and one forward pass) as JPEG bytes or as its file's bytes. Each image is judged by its margin, its
score minus its threshold (with ``thresholds`` "class" the threshold of its most probable class; with "global"
the one threshold, when the margin ranks as the score does; by default as the bundle's inference.json serves
them), so that the figures are those of the guard as served. For every method of ``bundle.ood`` and
every set (with ``builtin`` the far and near sets of ``scripts/ood_sets.py``; then the sets of ``sets_dir``, a folder
``scripts/ood_sets.py --output_dir`` wrote, e.g. where scikit-image was installed; then the ``folders`` given; each
replaces a set of the same name before it) it reports, with the out-of-distribution images as positives against
the test split:

- ``auroc``: the ROC AUC of the margin;
- ``fpr_at_95_tpr``: the share of the set's images with a margin at or under the one that keeps 95% of the test
  split (the images a guard tuned on test would still let through);
- ``flagged``: the share the served guard flags (a margin above 0), at its thresholds fitted on validation;

``far_all`` pools every far set (``far_*``). Per method it also reports the share of test images flagged, in
all and per class. Images serving refuses (too small, unreadable) never reach the guard: they are left out
and counted per set under ``refused``.

With ``refit`` it also refits the Mahalanobis guard with its statistics on each split of
``bundle.ood.STATISTICS`` (config key ``ood_statistics``) and each class weighting of
``bundle.ood.CLASS_WEIGHTS`` (``ood_class_weights``), its threshold always on validation, and reports, under
``refits`` (named ``<split>/<weighting>``), each fit's threshold, test images flagged and sets, as above:
one command compares the fits on any model without retraining or touching its sidecar.

Then what the guard costs a served batch: ``Predictor.predict`` on batches of 8 test images, with the guard and
without it (its hook removed, no score), one after the other per batch so that both see the same machine; it
prints ``RESULT guard_latency_ratio=<median with / median without>``.

Prints the tables as Markdown (docs/RESULTS.md) and writes everything to ``output``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import ood_sets  # noqa: E402

from bundle import ood  # noqa: E402
from bundle.data import IMAGE_SUFFIXES, load_datalist, preflight  # noqa: E402
from bundle.flags import as_bool  # noqa: E402
from bundle.labels import CLASS_NAMES  # noqa: E402
from bundle.metrics import binary_auc  # noqa: E402
from bundle.predictor import Predictor  # noqa: E402

BATCH = 64
LATENCY_BATCH = 8  # the archive's default server batch


def _forward(predictor: Predictor, images: list[bytes | Path], name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The logits and pooled features of each image (its bytes, or a file read when its batch comes: a training
    split at full resolution is gigabytes), and how many images serving refuses (e.g. too small to classify):
    those never reach the guard, so they are left out."""
    logits, features, refused = [], [], []
    for start in tqdm(range(0, len(images), BATCH), desc=name, unit="batch", leave=False):
        batch = []
        for image in images[start : start + BATCH]:
            try:
                batch.append(predictor.preprocess(image.read_bytes() if isinstance(image, Path) else image))
            except Exception as error:
                refused.append(str(error))
        if batch:
            batch_logits, batch_features = predictor.forward(torch.stack(batch))
            logits.append(batch_logits)
            features.append(batch_features)
    if refused:
        tqdm.write(f"{name}: {len(refused)} of {len(images)} images refused by serving, left out (first: {refused[0]})")
    if not logits:
        raise ValueError(f"{name}: serving refuses every one of its {len(images)} images (first: {refused[0]})")
    if any(f is None for f in features):
        raise ValueError("the network exposes no features (a TorchScript export?): use the state_dict weights")
    return torch.cat(logits), torch.cat(features), len(refused)


def _split(predictor: Predictor, datalist: str, dataset_dir: str, split: str) -> tuple[torch.Tensor, ...]:
    """The served logits and features of a datalist split's images, and their labels."""
    items = load_datalist(datalist, split, dataset_dir)
    logits, features, refused = _forward(predictor, [Path(item["image"]) for item in items], split)
    if refused:
        raise ValueError(f"serving refuses {refused} of the {split} split's images: the refit needs every one")
    return logits, features, torch.tensor([int(item["label"]) for item in items])


def _refits(
    predictor: Predictor, datalist: str, dataset_dir: str, target_share: float, by_class: bool
) -> dict[str, ood.Guard]:
    """The Mahalanobis guard fitted with its statistics on each split and each class weighting, named
    ``<split>/<weighting>``; the thresholds from the validation split (each class's with ``by_class``)."""
    logits, features, labels = _split(predictor, datalist, dataset_dir, "validation")
    training = _split(predictor, datalist, dataset_dir, "training")
    refits = {}
    for split in ood.STATISTICS:
        reference = None if split == "validation" else (training[1], training[2])
        for weights in ood.CLASS_WEIGHTS:
            fitted = ood.fit(logits, features, labels, target_share, weights, reference)
            statistics = fitted.statistics | ood.whitening(fitted.statistics)
            class_thresholds = tuple(fitted.class_thresholds["mahalanobis"]) if by_class else None
            guard = ood.Guard(
                "mahalanobis", fitted.thresholds["mahalanobis"], statistics, target_share, class_thresholds
            )
            refits[f"{split}/{weights}"] = guard
    return refits


def _guard_cost(predictor: Predictor, images: list[bytes], batches: int) -> dict:
    """Median ``predict`` seconds per batch with and without the guard, paired batch by batch."""
    guard, tap = predictor.guard, predictor._tap
    timings: dict[str, list[float]] = {"with": [], "without": []}
    predictor.predict(images[:LATENCY_BATCH])  # warm-up
    for index in tqdm(range(batches), desc="latency", unit="batch", leave=False):
        start = index * LATENCY_BATCH % max(len(images) - LATENCY_BATCH, 1)
        batch = images[start : start + LATENCY_BATCH]
        for mode in ("with", "without"):
            if mode == "without":
                tap.close()
                predictor.guard, predictor._tap = None, None
            began = time.perf_counter()
            predictor.predict(batch)
            timings[mode].append(time.perf_counter() - began)
            if mode == "without":
                predictor.guard, predictor._tap = guard, ood.FeatureTap(predictor.network)
                tap = predictor._tap
    medians = {mode: statistics.median(values) for mode, values in timings.items()}
    return {
        "batch_size": LATENCY_BATCH,
        "batches": batches,
        "median_s_with_guard": medians["with"],
        "median_s_without_guard": medians["without"],
        "ratio": medians["with"] / medians["without"],
    }


def _folder_images(folder: str) -> list[bytes]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"--folders: {folder} holds no {'/'.join(IMAGE_SUFFIXES)} image")
    return [path.read_bytes() for path in paths]


def _written_sets(sets_dir: str | None) -> dict[str, str]:
    """The set folders ``scripts/ood_sets.py`` wrote to ``sets_dir``, named in its ``sets.json``."""
    if sets_dir is None:
        return {}
    listing = Path(sets_dir) / "sets.json"
    if not listing.is_file():
        raise FileNotFoundError(f"--sets_dir: {listing} is missing: write the sets with scripts/ood_sets.py")
    return {name: str(Path(sets_dir) / name) for name in json.loads(listing.read_text())}


def _against(test: np.ndarray, shifted: np.ndarray) -> dict:
    """A set's margins (score minus threshold) against the test split's."""
    kept = np.quantile(test, 0.95, method="higher")
    positives = np.r_[np.zeros(len(test), bool), np.ones(len(shifted), bool)]
    return {
        "n": int(len(shifted)),
        "auroc": binary_auc(np.r_[test, shifted], positives),
        "fpr_at_95_tpr": float((shifted <= kept).mean()),
        "flagged": float((shifted > 0).mean()),
    }


def evaluate(
    dataset_dir: str,
    datalist: str,
    bundle_root: str = str(REPO),
    weights: str | None = None,
    folders: dict | None = None,
    sets_dir: str | None = None,
    builtin: bool | str = True,
    split: str = "testing",
    output: str | None = None,
    device: str | None = None,
    latency_batches: int = 20,
    refit: bool | str = False,
    thresholds: str | None = None,
) -> None:
    builtin = as_bool(builtin, "--builtin")  # fire hands "--builtin false" over as text
    refit = as_bool(refit, "--refit")
    # every split it reads, checked before any work as the bundle's runs check theirs
    preflight(datalist, dataset_dir, keys=[split, "training", "validation"] if refit else [split])
    predictor = Predictor(bundle_root, weights, device=device)
    if thresholds is None:  # as the bundle serves them (inference.json's ood_thresholds)
        served = predictor.guard is None or predictor.guard.class_thresholds is not None
        thresholds = ood.THRESHOLDS[0] if served else "global"
    by_class = ood.check_thresholds(thresholds) == "class"
    block, statistics = ood.load_fit(predictor.weights)
    if by_class and not block.get("class_thresholds"):
        raise ValueError(
            f"the guard of {predictor.weights} was fitted before class thresholds: refit its calibration "
            "(configs/calibrate.json) or measure it with --thresholds global"
        )
    refits = _refits(predictor, datalist, dataset_dir, block["target_share"], by_class) if refit else {}

    def margins(logits: torch.Tensor, features: torch.Tensor) -> dict[str, np.ndarray]:
        """Every method's score minus the image's threshold, as served; then each refit's."""
        scores = ood.all_scores(logits, features, statistics)
        served = ood.served_thresholds(block, by_class, logits)
        refitted = {name: guard.scores(None, features) - guard.thresholds(logits) for name, guard in refits.items()}
        return {method: scores[method] - served[method] for method in ood.METHODS} | refitted

    items = load_datalist(datalist, split, dataset_dir)
    labels = np.array([int(item["label"]) for item in items])
    test_images = [Path(item["image"]).read_bytes() for item in items]
    test_logits, test_features, _ = _forward(predictor, test_images, split)
    test = margins(test_logits, test_features)

    sets: dict[str, list[bytes]] = {}
    if builtin:
        built = ood_sets.build([Path(item["image"]) for item in items])
        sets |= {name: [ood_sets.jpeg(image) for image in images] for name, images in built.items()}
    # a folder replaces the built-in set of its name (e.g. far sets written where more packages were installed)
    sets |= {name: _folder_images(folder) for name, folder in {**_written_sets(sets_dir), **(folders or {})}.items()}
    results = {
        "weights": str(predictor.weights),
        "image_size": predictor.image_size,
        "served_method": predictor.guard.method if predictor.guard else None,
        "thresholds_kind": thresholds,
        "thresholds": block["thresholds"],
        "class_thresholds": block.get("class_thresholds") if by_class else None,
        "target_share": block["target_share"],
        "in_distribution": {
            "split": split,
            "n": len(items),
            "flagged_share": {
                method: ood.flagged_shares(test[method] > 0, labels, list(CLASS_NAMES)) for method in ood.METHODS
            },
        },
        "sets": {},
        "refused": {},
    }
    if refits:
        results["refits"] = {
            fit_name: {
                "threshold": guard.threshold,
                "class_thresholds": guard.class_thresholds,
                "in_distribution": ood.flagged_shares(test[fit_name] > 0, labels, list(CLASS_NAMES)),
                "sets": {},
            }
            for fit_name, guard in refits.items()
        }
    # the margins of each set's images: per method, then per refit
    far: dict[str, list[np.ndarray]] = {key: [] for key in (*ood.METHODS, *refits)}
    for name, images in sets.items():
        logits, features, refused = _forward(predictor, images, name)
        shifted = margins(logits, features)
        if refused:
            results["refused"][name] = refused
        results["sets"][name] = {method: _against(test[method], shifted[method]) for method in ood.METHODS}
        for fit_name in refits:
            results["refits"][fit_name]["sets"][name] = _against(test[fit_name], shifted[fit_name])
        for key in far if name.startswith("far_") else ():
            far[key].append(shifted[key])
    if far[ood.METHODS[0]]:  # the goal is on the far sets together
        results["sets"]["far_all"] = {
            method: _against(test[method], np.concatenate(far[method])) for method in ood.METHODS
        }
        for fit_name in refits:
            results["refits"][fit_name]["sets"]["far_all"] = _against(test[fit_name], np.concatenate(far[fit_name]))
    if latency_batches and predictor.guard is not None:
        results["latency"] = _guard_cost(predictor, test_images, latency_batches)
    print(_markdown(results))
    if "latency" in results:
        latency = results["latency"]
        print(
            f"RESULT guard_latency_ratio={latency['ratio']:.3f} with_ms={1000 * latency['median_s_with_guard']:.1f} "
            f"without_ms={1000 * latency['median_s_without_guard']:.1f} batch={latency['batch_size']}"
        )
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=1))


def _shares_row(label: str, shares: dict, *more: str) -> str:
    """A Markdown row of test images flagged: in all, the class mean, per class, then the ``more`` cells."""
    per_class = shares["per_class"]
    cells = ["n/a" if per_class[c] is None else f"{per_class[c]:.3f}" for c in CLASS_NAMES]
    return f"| {label} | {shares['all']:.3f} | {shares['class_mean']:.3f} | " + " | ".join([*cells, *more]) + " |"


def _markdown(results: dict) -> str:
    methods = ood.METHODS
    lines = [
        "| set | n | " + " | ".join(f"{m} AUROC / FPR@95 / flagged" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for name, by_method in results["sets"].items():
        cells = []
        for method in methods:
            r = by_method[method]
            auroc = "n/a" if r["auroc"] is None else f"{r['auroc']:.3f}"
            cells.append(f"{auroc} / {r['fpr_at_95_tpr']:.3f} / {r['flagged']:.3f}")
        lines.append(f"| {name} | {next(iter(by_method.values()))['n']} | " + " | ".join(cells) + " |")
    flagged = results["in_distribution"]["flagged_share"]
    kind = "each image its most probable class's" if results["thresholds_kind"] == "class" else "one for all"
    lines += [
        "",
        f"In-distribution ({results['in_distribution']['split']}, n={results['in_distribution']['n']}) flagged "
        f"at the validation thresholds ({kind}):",
        "",
        "| method | all | class mean | " + " | ".join(CLASS_NAMES) + " |",
        "|---|---|---|" + "---|" * len(CLASS_NAMES),
    ]
    lines += [_shares_row(method, flagged[method]) for method in methods]
    if "refits" in results:
        lines += [
            "",
            "Mahalanobis refitted with its statistics on each split and each class weighting (config keys "
            "ood_statistics, ood_class_weights), the threshold on validation:",
            "",
            "| statistics / class weights | all | class mean | "
            + " | ".join(CLASS_NAMES)
            + " | far_all AUROC / FPR@95 / flagged |",
            "|---|---|---|" + "---|" * len(CLASS_NAMES) + "---|",
        ]
        for name, fitted in results["refits"].items():
            far = fitted["sets"].get("far_all")
            far_cell = (
                "n/a" if far is None else f"{far['auroc']:.3f} / {far['fpr_at_95_tpr']:.3f} / {far['flagged']:.3f}"
            )
            lines.append(_shares_row(name, fitted["in_distribution"], far_cell))
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(evaluate)
