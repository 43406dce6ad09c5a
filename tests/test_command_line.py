"""A `python -m monai.bundle run` command line whose keys no config declares stops before any work, naming them."""

import json
import subprocess
import sys

import pytest

from bundle.command_line import check_overrides
from tests.bundle_runs import REPO

MONAI_MAIN = "/venv/lib/python3.12/site-packages/monai/bundle/__main__.py"  # sys.argv[0] of `python -m monai.bundle`
TRAIN = ["--config_file", "['configs/train.json','configs/train_ham10000.json']"]


@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch):
    monkeypatch.chdir(REPO)  # the config files are named relative to it, as users name them


def run_command(*arguments: str) -> list[str]:
    return [MONAI_MAIN, "run", *arguments]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--max_epoch", "3"], "--max_epoch (did you mean --max_epochs?)"),
        (["--learning-rat=0.1"], "--learning_rat (did you mean --learning_rate?)"),
        (["--train#trainer#max_epoch", "3"], "--train#trainer#max_epoch (did you mean --train#trainer#max_epochs?)"),
        (["--colour_constancy", "true"], "--colour_constancy."),
    ],
)
def test_a_key_no_config_declares_is_refused_with_the_closest_declared_one(arguments, expected):
    with pytest.raises(ValueError) as refused:
        check_overrides(run_command(*TRAIN, *arguments))
    assert str(refused.value).startswith(f"unknown config key(s) on the command line: {expected}")
    assert "configs/train.json, configs/train_ham10000.json declares them" in str(refused.value)


def test_declared_keys_run_arguments_and_an_overlays_own_keys_pass():
    check_overrides(
        run_command(
            *TRAIN,
            *("--max_epochs", "2", "--image_size", "[32,32]", "--augment#cutmix_alpha=1.0", "--resume", "false"),
            *("--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", "--tracking", "mlflow"),
        )
    )
    check_overrides(run_command("--config_file", "configs/inference.json", "--input", "images", "--output_dir", "x"))
    # what run() hands on to create_workflow / ConfigWorkflow
    check_overrides(run_command("--config_file", "configs/inference.json", "--workflow_type", "infer"))
    check_overrides(run_command("--config_file", "configs/inference.json", "--workflow_name", "ConfigWorkflow"))


def test_an_args_files_keys_are_checked_too(tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": "configs/inference.json", "input": "images", "outptu_dir": "x"}))
    with pytest.raises(ValueError, match=r"--outptu_dir \(did you mean --output_dir\?\)"):
        check_overrides(run_command("--args_file", str(args)))


def test_other_processes_and_commands_are_left_alone():
    check_overrides(["pytest", "run", "--max_epoch", "3"])  # the bundle built from Python: no command line of its own
    check_overrides([MONAI_MAIN, "ckpt_export", "--filepath", "models/model.ts"])


def test_the_bundle_command_stops_before_any_work():
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input", "images"]
        + ["--ouput_dir", "somewhere"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "unknown config key(s) on the command line: --ouput_dir (did you mean --output_dir?)" in result.stderr
    assert "ckpt_path" not in result.stderr, "the check comes before every other step"
