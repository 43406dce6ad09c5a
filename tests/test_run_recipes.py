"""scripts/run_recipes.py: every named run trained and evaluated on one datalist, one table row each."""

import json
import subprocess
import sys

from bundle.synthetic import generate
from tests.bundle_runs import REPO, bundle_env


def test_each_run_is_trained_evaluated_and_tabulated(tmp_path):
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
        ],
        cwd=REPO,
        env=bundle_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "work" / "runs.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == ["tiny"], "the failing run is reported, not tabulated"
    row = rows[0]
    assert row["image_size"] == [32, 32] and row["epochs"] == 1
    assert 0 <= row["test_auc"] <= 1 and 0 <= row["val_balanced_accuracy"] <= 1
    assert "run broken failed" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("| tiny | train.json")
