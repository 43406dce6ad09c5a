"""scripts/simulate_fastfile.py as users run it, on the small synthetic set: every image is fetched once and
read twice, and a first-read latency costs the preflight about files x latency / threads."""

import json
import subprocess
import sys

from tests.bundle_runs import REPO

LATENCY_MS = 40


def test_fastfile_simulation_fetches_each_image_once_and_pays_its_latency_in_the_preflight(synthetic_dir, tmp_path):
    output = tmp_path / "fastfile.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/simulate_fastfile.py",
            "--dataset_dir",
            str(synthetic_dir),
            "--image_size",
            "[32,32]",
            "--latency_ms",
            f"[0,{LATENCY_MS}]",
            "--output",
            str(output),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    local, lazy = report["rows"]
    for row in (local, lazy):
        assert (row["files_fetched"], row["opens"]) == (report["images"], 2 * report["images"])
    # the fetches are the preflight's: one sleep per image, spread over its threads
    preflight = sum(value for name, value in lazy["seconds"].items() if name.startswith("preflight"))
    assert preflight >= report["images"] * LATENCY_MS / 1000 / report["preflight_threads"]
    assert lazy["total_s"] > local["total_s"]
