"""SageMaker training jobs, offline: scripts/sagemaker_train.py launches against a local moto server, then
the job runs as its containers would, through the SDK's own sm_train.sh and torchrun_driver.py under a
simulated /opt/ml, on one host and on two (two processes on loopback, gloo on the CPU)."""

import json
import subprocess
import sys
import tarfile

import pytest

from tests.aws_local import (BUCKET, REGION, ROLE, free_port, local_aws, require, simulated_container,
                             start_container, upload_folder)
from tests.bundle_runs import REPO

# Small and fast on 2 CPU cores; strings as SageMaker carries them.
HYPERPARAMETERS = {"epochs": "1", "image_size": "[32, 32]", "batch_size": "16", "num_workers": "0"}


def launch(*args, **hyperparameters) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/sagemaker_train.py", *args]
    for key, value in hyperparameters.items():
        command += [f"--{key}", value]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def launched(result: subprocess.CompletedProcess) -> dict:
    """The job a successful launch printed, as describe_training_job returns it."""
    import boto3

    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName=lines["training job"])
    assert lines["model artifact"] == f"{job['OutputDataConfig']['S3OutputPath']}/{job['TrainingJobName']}/output/model.tar.gz"
    return job


def channel(job: dict, name: str) -> str:
    (uri,) = [c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"] if c["ChannelName"] == name]
    return uri


def s3_text(uri: str) -> str:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()


@pytest.fixture(scope="module")
def aws(tmp_path_factory, synthetic_dir):
    require("sagemaker.train")
    with local_aws(tmp_path_factory.mktemp("aws")) as env:
        env["data"] = upload_folder(synthetic_dir, BUCKET, "ham10000")
        yield env


@pytest.fixture(scope="module")
def one_host_job(aws):
    return launched(launch("--data", aws["data"], "--role", ROLE, "--bucket", BUCKET, "--region", REGION,
                           "--instance_type", "ml.g5.xlarge", **HYPERPARAMETERS))


@pytest.fixture(scope="module")
def two_host_job(aws):
    return launched(launch("--data", aws["data"], "--role", ROLE, "--bucket", BUCKET, "--region", REGION,
                           "--instance_type", "ml.m5.xlarge", "--instance_count", "2", **HYPERPARAMETERS))


def test_the_launched_job_has_the_image_instances_hyperparameters_data_and_source(aws, one_host_job):
    job = one_host_job
    assert job["AlgorithmSpecification"]["TrainingImage"].endswith("/pytorch-training:2.10-gpu-py313")
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 1
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 86400  # not the SDK's 3600 s
    assert job["RoleArn"] == ROLE
    assert job["HyperParameters"] == HYPERPARAMETERS
    assert channel(job, "training") == aws["data"]
    code = channel(job, "code")
    assert code.startswith(f"s3://{BUCKET}/")
    assert "monai" in s3_text(code + "/requirements.txt")
    assert s3_text(code + "/scripts/sagemaker_entry.py") == (REPO / "scripts" / "sagemaker_entry.py").read_text()
    assert s3_text(code + "/configs/train.json") == (REPO / "configs" / "train.json").read_text()
    train_script = s3_text(channel(job, "sm_drivers") + "/sm_train.sh")
    assert "distributed_drivers/torchrun_driver.py" in train_script
    assert json.loads(s3_text(channel(job, "sm_drivers") + "/sourcecode.json"))["entry_script"] == "scripts/sagemaker_entry.py"


def test_torchrun_false_runs_one_plain_process(aws):
    job = launched(launch("--data", aws["data"], "--role", ROLE, "--bucket", BUCKET, "--torchrun", "false",
                          "--instance_type", "ml.c5.2xlarge", "--gpus_per_instance", "1", **HYPERPARAMETERS))
    train_script = s3_text(channel(job, "sm_drivers") + "/sm_train.sh")
    assert "basic_script_driver.py" in train_script and "torchrun_driver.py" not in train_script
    assert job["AlgorithmSpecification"]["TrainingImage"].endswith("/pytorch-training:2.10-cpu-py313")


def test_a_two_instance_job_uses_torchrun(two_host_job):
    assert two_host_job["ResourceConfig"]["InstanceCount"] == 2
    assert "torchrun_driver.py" in s3_text(channel(two_host_job, "sm_drivers") + "/sm_train.sh")


@pytest.mark.parametrize("args, expected", [
    (["--data", "ham10000/"], "--data 'ham10000/' is not an S3 URI"),
    (["--data", "s3://Not_A_Bucket/x"], "is not an S3 URI"),
    (["--instance_count", "0"], "--instance_count must be a whole number of instances, at least 1, not 0"),
    (["--instance_type", "ml.m5.huge"], "unknown training instance type 'ml.m5.huge'; ml.m5 offers ml.m5.12xlarge"),
    (["--instance_type", "p3.2xlarge"], "unknown training instance type 'p3.2xlarge'"),
    (["--epoch", "3"], "unknown hyperparameter 'epoch' (did you mean 'epochs'?)"),
    (["--datalist", "x.json"], "'datalist' is set by the training job itself"),
    (["--role", ""], "no IAM role for SageMaker: pass --role or set SAGEMAKER_ROLE_ARN"),
    (["--role", "admin"], "--role 'admin' is not an IAM role ARN"),
    (["--bucket", ""], "no S3 bucket for code and artifacts: pass --bucket or set SAGEMAKER_BUCKET"),
    (["--instance_count", "2", "--torchrun", "false"], "--instance_count above 1 needs --torchrun"),
])
def test_bad_launch_arguments_fail_before_anything_is_uploaded(aws, args, expected):
    import boto3

    before = boto3.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"]
    jobs = len(boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"])
    defaults = {"--data": aws["data"], "--role": ROLE, "--bucket": BUCKET}
    for flag, value in zip(args[::2], args[1::2]):
        defaults[flag] = value
    result = launch(*[item for pair in defaults.items() for item in pair if pair[1] != ""])
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-3000:]
    assert boto3.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"] == before
    assert len(boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]) == jobs


def test_the_sdk_session_has_telemetry_opted_out(aws, monkeypatch):
    monkeypatch.delenv("SAGEMAKER_USER_CONFIG_OVERRIDE")
    from cloud import aws as cloud_aws

    session = cloud_aws.session(REGION, BUCKET)
    from sagemaker.core.common_utils import resolve_value_from_config
    from sagemaker.core.config.config_schema import TELEMETRY_OPT_OUT_PATH

    assert resolve_value_from_config(config_path=TELEMETRY_OPT_OUT_PATH, default_value=False,
                                     sagemaker_session=session) is True
