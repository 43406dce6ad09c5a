"""SageMaker as it runs in production, offline: managed spot training that resumes, the job's metric
definitions, TensorBoard, the input mode and the retry strategy.

scripts/sagemaker_train.py launches against a local moto server; the request it sent is read back as
sent (moto keeps canned metric definitions and drops the retry strategy, tests/aws_local.py). The
spot job then runs as its containers would, through the SDK's own sm_train.sh under a simulated
/opt/ml: a first container is killed mid-epoch, its checkpoint folder synced to the job's checkpoint
URI as SageMaker does, and a fresh container of the same job resumes from it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cloud.job_metrics import METRICS
from tests.aws_local import (
    BUCKET,
    ROLE,
    free_port,
    local_aws,
    local_path,
    recorded_training_job_request,
    recording_hooks,
    require,
    simulated_container,
    start_container,
    sync_checkpoints,
    upload_folder,
)
from tests.bundle_runs import REPO

# Two epochs: the kill cuts the second, the restart runs it again. Small and fast on 2 CPU cores.
HYPERPARAMETERS = {"epochs": "2", "image_size": "[32, 32]", "batch_size": "16"}
CHECKPOINTS, TENSORBOARD = "/opt/ml/checkpoints", "/opt/ml/output/tensorboard"


@pytest.fixture(scope="module")
def aws(tmp_path_factory, synthetic_dir):
    require("sagemaker.train")
    record = tmp_path_factory.mktemp("requests") / "create_training_job.jsonl"
    hooks = recording_hooks(tmp_path_factory.mktemp("hooks"), record_to=record)
    with local_aws(tmp_path_factory.mktemp("aws")) as env:
        env |= hooks | {"record": record, "data": upload_folder(synthetic_dir, BUCKET, "ham10000")}
        yield env


def launch(aws: dict, *args: str, **hyperparameters: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/sagemaker_train.py", "--data", aws["data"], "--role", ROLE, "--bucket", BUCKET]
    for key, value in (HYPERPARAMETERS | hyperparameters).items():
        command += [f"--{key}", value]
    env = dict(os.environ, PYTHONPATH=aws["PYTHONPATH"])
    return subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def launched(aws: dict, *args: str, **hyperparameters: str) -> tuple[dict, dict, dict]:
    """(the job as moto describes it, the CreateTrainingJob request as sent, the launcher's printed lines)."""
    import boto3

    result = launch(aws, *args, **hyperparameters)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName=printed["training job"])
    return job, recorded_training_job_request(aws["record"], printed["training job"]), printed


@pytest.fixture(scope="module")
def spot_job(aws):
    return launched(aws, "--spot", "true", "--max_wait_s", "90000", "--retry_attempts", "2")


def channels(request: dict) -> dict:
    return {channel["ChannelName"]: channel for channel in request["InputDataConfig"]}


def test_a_spot_job_has_spot_capacity_a_max_wait_checkpoints_retries_metrics_and_tensorboard(aws, spot_job):
    job, request, printed = spot_job
    name = job["TrainingJobName"]
    assert request["EnableManagedSpotTraining"] is True and job["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 90000}
    checkpoint_uri = f"s3://{BUCKET}/skin-lesion/{name}/checkpoints"  # the SDK's default, beside the job's artifacts
    assert request["CheckpointConfig"] == job["CheckpointConfig"] == {"S3Uri": checkpoint_uri, "LocalPath": CHECKPOINTS}
    assert printed["checkpoints"] == checkpoint_uri
    assert request["RetryStrategy"] == {"MaximumRetryAttempts": 2}
    assert request["TensorBoardOutputConfig"] == {
        "S3OutputPath": f"s3://{BUCKET}/skin-lesion/tensorboard",
        "LocalPath": TENSORBOARD,
    }
    metric_definitions = request["AlgorithmSpecification"]["MetricDefinitions"]
    assert {definition["Name"]: definition["Regex"] for definition in metric_definitions} == METRICS
    # the entry script is told the container's synced folders
    assert job["HyperParameters"] == HYPERPARAMETERS | {"checkpoint_dir": CHECKPOINTS, "tensorboard_dir": TENSORBOARD}
    assert channels(request)["training"]["InputMode"] == "File"


def test_the_default_job_has_no_spot_checkpoints_or_retries_and_fastfile_streams_only_the_data(aws):
    _, request, printed = launched(aws, "--input_mode", "FastFile", "--tensorboard", "false")
    for key in ("EnableManagedSpotTraining", "CheckpointConfig", "RetryStrategy", "TensorBoardOutputConfig"):
        assert not request.get(key), key
    assert "MaxWaitTimeInSeconds" not in request["StoppingCondition"] and "checkpoints" not in printed
    assert request["HyperParameters"] == HYPERPARAMETERS  # no checkpoint or TensorBoard folder
    assert {definition["Name"] for definition in request["AlgorithmSpecification"]["MetricDefinitions"]} == set(METRICS)
    assert request["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    modes = {name: channel["InputMode"] for name, channel in channels(request).items()}
    assert modes == {"training": "FastFile", "code": "File", "sm_drivers": "File"}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--spot", "maybe"], "--spot takes true or false, not 'maybe'"),
        (["--max_wait_s", "90000"], "--max_wait_s is the wait for spot capacity: it needs --spot true"),
        (["--spot", "true", "--max_wait_s", "3600"], "--max_wait_s must be a whole number of seconds, at least"),
        (["--retry_attempts", "31"], "--retry_attempts must be a whole number from 0 (off) to 30, not 31"),
        (["--retry_attempts", "-1"], "--retry_attempts must be a whole number from 0 (off) to 30, not -1"),
        (["--checkpoint_s3", f"s3://{BUCKET}/c"], "--checkpoint_s3 needs checkpoints: pass --spot true"),
        (["--spot", "true", "--checkpoint_s3", "checkpoints/"], "--checkpoint_s3 'checkpoints/' is not an S3 URI"),
        (["--input_mode", "Pipe"], "--input_mode must be one of File, FastFile, not 'Pipe'"),
        (["--tensorboard", "sometimes"], "--tensorboard takes true or false, not 'sometimes'"),
        (["--checkpoint_dir", "/tmp/c"], "--checkpoint_dir is set by the launcher (--spot true or --retry_attempts)"),
    ],
)
def test_bad_production_options_fail_before_anything_is_uploaded(aws, args, expected):
    import boto3

    before = boto3.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"]
    jobs = len(boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"])
    result = launch(aws, *args)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-3000:]
    assert boto3.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"] == before
    assert len(boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]) == jobs


def run_container(job: dict, root, log) -> tuple:
    opt_ml = simulated_container(job, root, "algo-1", free_port())
    return opt_ml, start_container(opt_ml, job["TrainingJobName"], log)


def kill_after_first_epoch(process: subprocess.Popen, checkpoints, log) -> None:
    """Stop the whole container, as a reclaimed spot instance is stopped, once epoch 1's resume
    checkpoint is written: in the middle of epoch 2."""
    deadline = time.monotonic() + 600
    while not (checkpoints / "checkpoint_last.pt").exists():
        assert process.poll() is None, log.read_text()[-6000:]
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def metric_values(definitions: list[dict], log: str) -> dict[str, list[float]]:
    """What SageMaker records from a job's log: every line searched with every regex, the first capture
    group taken as a float."""
    values = {definition["Name"]: [] for definition in definitions}
    for line in log.splitlines():
        for definition in definitions:
            match = re.search(definition["Regex"], line)
            if match:
                values[definition["Name"]].append(float(match.group(1)))
    return values


@pytest.fixture(scope="module")
def resumed(aws, spot_job, tmp_path_factory):
    """The spot job killed mid-epoch 2, a relaunch on its checkpoints with another image size and split
    refused, then the job restarted on its checkpoints, run to the end."""
    job, request, _ = spot_job
    root = tmp_path_factory.mktemp("spot")
    first_log = root / "first.log"
    first, process = run_container(job, root / "first", first_log)
    first_checkpoints = local_path(first, CHECKPOINTS)
    kill_after_first_epoch(process, first_checkpoints, first_log)
    sync_checkpoints(job, first)

    other, _, _ = launched(
        aws,
        "--spot",
        "true",
        "--checkpoint_s3",
        job["CheckpointConfig"]["S3Uri"],
        image_size="[24, 24]",
        split_seed="1",
    )
    refused, process = run_container(other, root / "refused", root / "refused.log")
    refused_status = process.wait(timeout=600)

    restarted, process = run_container(job, root / "restarted", root / "restarted.log")
    assert process.wait(timeout=900) == 0, (root / "restarted.log").read_text()[-6000:]
    return {
        "job": job,
        "request": request,
        "first": first,
        "first_log": first_log.read_text(),
        "refused": refused,
        "refused_status": refused_status,
        "refused_log": (root / "refused.log").read_text(),
        "restarted": restarted,
        "restarted_log": (root / "restarted.log").read_text(),
    }


def test_a_spot_job_killed_mid_epoch_resumes_from_its_checkpoint_and_loses_only_that_epoch(resumed):
    first_history = json.loads((local_path(resumed["first"], CHECKPOINTS) / "history.json").read_text())
    assert [row["epoch"] for row in first_history] == [1]  # killed during epoch 2
    restarted = resumed["restarted"]
    assert "resumed from" in resumed["restarted_log"] and "at epoch 1 of 2" in resumed["restarted_log"]
    history = json.loads((local_path(restarted, CHECKPOINTS) / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0] == first_history[0]  # epoch 1 is the first run's, not trained again
    assert json.loads((restarted / "output" / "data" / "history.json").read_text()) == history
    assert (restarted / "model" / "models" / "model.pt").is_file()
    assert "auc_macro" in json.loads((restarted / "output" / "data" / "metrics.json").read_text())


def test_a_checkpoint_of_another_datalist_and_image_size_is_refused_with_the_reason_as_the_failure(resumed):
    assert resumed["refused_status"] != 0
    failure = (resumed["refused"] / "output" / "failure").read_text()
    assert "cannot resume from" in failure, resumed["refused_log"][-4000:]
    assert "image_size [32, 32], this run's is [24, 24]" in failure and "datalist 'sha256:" in failure
    assert not any((resumed["refused"] / "model").iterdir())


def test_the_jobs_metric_definitions_read_every_epoch_and_the_test_metrics_from_its_log(resumed):
    """SageMaker reads the log of every run of the job: the killed one's and the restarted one's."""
    values = metric_values(
        resumed["request"]["AlgorithmSpecification"]["MetricDefinitions"],
        resumed["first_log"] + resumed["restarted_log"],
    )
    history = json.loads((local_path(resumed["restarted"], CHECKPOINTS) / "history.json").read_text())
    assert values["train:loss"] == [round(row["train_loss"], 4) for row in history]
    assert values["validation:auc"] == [round(row["val_auc"], 4) for row in history]
    metrics = json.loads((resumed["restarted"] / "output" / "data" / "metrics.json").read_text())
    expected = {
        "test:auc_macro": metrics["auc_macro"],
        "test:accuracy": metrics["accuracy"],
        "test:balanced_accuracy": metrics["balanced_accuracy"],
        "test:ece": metrics["expected_calibration_error"],
        "test:malignant_auc": metrics["triage"]["malignant_auc"],
        "test:sensitivity": metrics["triage"]["sensitivity"],
        "test:specificity": metrics["triage"]["specificity"],
    }
    for name, value in expected.items():
        assert values[name] == [pytest.approx(value, abs=5e-5)], name


def test_tensorboard_files_land_in_the_jobs_tensorboard_folder_one_run_per_job(resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for opt_ml in (resumed["first"], resumed["restarted"]):
        run = local_path(opt_ml, TENSORBOARD) / resumed["job"]["TrainingJobName"]
        accumulator = EventAccumulator(str(run))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train_loss", "val_auc"} <= tags
