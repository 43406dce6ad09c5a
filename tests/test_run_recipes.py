"""scripts/run_recipes.py: every named run trained and evaluated on one datalist, one table row each."""

import json
import subprocess
import sys

import pytest
from monai.bundle import ConfigParser

from bundle.synthetic import generate
from tests.bundle_runs import REPO, bundle_env


def test_each_run_is_trained_evaluated_and_tabulated_per_seed_several_at_once(tmp_path):
    images = generate(tmp_path / "data", n_images=140, image_size=(64, 48), seed=2)
    runs = {
        "tiny": {"image_size": [32, 32], "max_epochs": 1, "batch_size": 32, "num_workers": 0},
        "broken": {"image_size": [32, 32], "max_epochs": 1, "imbalance": "oversample"},
    }
    result = subprocess.run(
        [
            sys.executable,
            "scripts/run_recipes.py",
            "--dataset_dir",
            str(images),
            "--work_dir",
            str(tmp_path / "work"),
            "--runs",
            json.dumps(runs),
            "--seeds",
            "[0,1]",
            "--parallel",
            "2",
            "--alone_first",
            "true",
        ],
        cwd=REPO,
        env=bundle_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "work" / "runs.jsonl").read_text().splitlines()]
    assert rows[0]["name"] == "tiny_s0", "the first run goes alone, before the others"
    assert sorted(row["name"] for row in rows) == ["tiny_s0", "tiny_s1"], "the failing runs are reported, not tabulated"
    assert [row["options"]["seed"] for row in rows] == [0, 1]
    for row in rows:
        assert row["image_size"] == [32, 32] and row["epochs"] == 1
        assert 0 <= row["test_auc"] <= 1 and 0 <= row["val_balanced_accuracy"] <= 1
        assert row["train_img_per_s"] is None, "one epoch: no steady-state epoch after the warm-up one"
    assert "run broken_s0 failed" in result.stdout and "run broken_s1 failed" in result.stdout
    parallel = json.loads((tmp_path / "work" / "parallel.json").read_text())
    assert parallel["parallel"] == 2 and parallel["runs_together"] == 1
    table, summary = result.stdout.strip().split("\n\n")[-2:]
    assert table.splitlines()[-1].startswith("| tiny_s1 | train.json")
    (variant,) = [line for line in summary.splitlines() if line.startswith("| tiny |")]
    assert variant.split(" | ")[1] == "2", "the two seeds make one variant"
    assert " ± " in variant.split(" | ")[2], "mean ± sd over the seeds"


@pytest.mark.parametrize("recipes", sorted((REPO / "scripts" / "recipes").glob("*.json")), ids=lambda p: p.name)
def test_prepared_recipes_name_only_keys_the_configs_have(recipes):
    """MONAI takes a misspelt top-level key as a new one and trains without it: a GPU session's prepared
    runs must name keys train.json (with the run's overlays) declares."""
    for name, options in json.loads(recipes.read_text()).items():
        parser = ConfigParser()
        parser.read_config([str(REPO / "configs" / "train.json"), *(str(REPO / c) for c in options.get("config", []))])
        unknown = [key for key in options if key != "config" and key not in parser]
        assert not unknown, f"{recipes.name}: run {name} sets keys train.json does not have: {unknown}"
