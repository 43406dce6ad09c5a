"""Validation's cost beside the network's, side by side in one process, on whatever device this machine has.

    python scripts/benchmark_validation.py --work_dir W [--dataset_dir D] [--image_size 64] [--rounds 5]
        [--network trivial|densenet]

Runs configs/train.json's validation evaluator whole (loader, inferer with its test-time views, postprocessing,
macro-AUC metric, every handler), built as ``monai.bundle run`` builds it, twice over the same weights: as
train.json declares it (``decollate`` off: the postprocessing, the metric and the handlers see each batch
whole) and decollating (MONAI's default: each image on its own). After one run of each (the first saves the
model and fits its calibration and out-of-distribution guard; later runs find no improvement), ``rounds``
runs of each in turn; the medians and their ratio.

``--network trivial`` (the default) validates a pooling + two linear layers with the DenseNet's 1,024 pooled
features, so that what is timed is validation's own work; ``densenet`` validates the bundle's network (an
untrained DenseNet121), to see that work's share of a real validation. Data: ``--dataset_dir``, else
$HAM10000_DIR, else a synthetic set generated in ``<work_dir>/synthetic``. Prints one JSON line.
"""

import json
import os
import statistics
import time
from pathlib import Path

import fire
import torch
from monai.bundle import create_workflow

from bundle import data, synthetic

REPO = Path(__file__).resolve().parents[1]


def _trivial_network(features: int = 1024, classes: int = 7) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(8),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 64, features),
        torch.nn.Linear(features, classes),  # the out-of-distribution tap reads what the last linear layer gets
    )


def main(
    work_dir: str, dataset_dir: str | None = None, image_size: int = 64, rounds: int = 5, network: str = "trivial"
) -> dict:
    if network not in ("trivial", "densenet"):
        raise ValueError(f"--network must be 'trivial' or 'densenet', got {network!r}")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    dataset_dir = (
        dataset_dir or os.environ.get("HAM10000_DIR") or str(synthetic.generate(work / "synthetic", n_images=300))
    )
    datalist = work / "datalist.json"
    data.write_datalist(data.split_by_lesion(data.read_ham10000(dataset_dir), seed=0), datalist, dataset_dir)
    workflow = create_workflow(
        config_file=str(REPO / "configs" / "train.json"),
        bundle_root=str(work / "bundle"),
        cache_dir=str(work / "cache"),
        dataset_dir=str(dataset_dir),
        datalist=str(datalist),
        resume=False,
        image_size=[image_size, image_size],
    )
    parser = workflow.parser
    device = parser.get_parsed_content("device")
    # one network object for both evaluators: the same weights, the same scores, the same handlers' work
    validated = _trivial_network() if network == "trivial" else parser.get_parsed_content("network_def")
    parser["validate#network"] = validated.to(device)
    evaluators = {}
    for decollate in (False, True):
        parser["validate#evaluator#decollate"] = decollate
        evaluators[decollate] = parser.get_parsed_content("validate#evaluator", lazy=False)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    metrics = {}
    for round_ in range(int(rounds) + 1):
        for decollate, evaluator in evaluators.items():
            began = time.perf_counter()
            evaluator.run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:  # the first run of each saves the model and fits; the others time validation alone
                seconds[decollate].append(time.perf_counter() - began)
            metrics[decollate] = float(evaluator.state.metrics["val_auc"])
    if metrics[False] != metrics[True]:
        raise RuntimeError(f"the two evaluators disagree on the validation AUC: {metrics}")
    medians = {decollate: statistics.median(values) for decollate, values in seconds.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "network": network,
        "image_size": image_size,
        "images": len(parser.get_parsed_content("validate#datalist")),
        "rounds": int(rounds),
        "s_decollate_off": medians[False],
        "s_decollate_on": medians[True],
        "on_vs_off": medians[True] / medians[False],
        "val_auc": metrics[False],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    fire.Fire(main)
