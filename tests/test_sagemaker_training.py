"""SageMaker training jobs, offline: scripts/sagemaker_train.py launches against a local moto server, then
the job runs as its containers would, through the SDK's own sm_train.sh and torchrun_driver.py under a
simulated /opt/ml, on one host and on two (two processes on loopback, gloo on the CPU)."""

import json
import subprocess
import sys

import pytest

from tests.aws_local import (
    BUCKET,
    REGION,
    ROLE,
    free_port,
    inference_toolkit,
    local_aws,
    require,
    simulated_container,
    start_container,
    upload_folder,
)
from tests.bundle_runs import REPO
from tests.serving import assert_well_formed

# Small and fast on 2 CPU cores; strings as SageMaker carries them.
HYPERPARAMETERS = {"epochs": "1", "image_size": "[32, 32]", "batch_size": "16"}


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
    output_path = job["OutputDataConfig"]["S3OutputPath"]
    assert lines["model artifact"] == f"{output_path}/{job['TrainingJobName']}/output/model.tar.gz"
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


def launched_job(aws: dict, *args: str) -> dict:
    """A job launched with the test's data, role and bucket (region as set), the small hyperparameters and ``args``."""
    return launched(launch("--data", aws["data"], "--role", ROLE, "--bucket", BUCKET, *args, **HYPERPARAMETERS))


@pytest.fixture(scope="module")
def one_host_job(aws):
    return launched_job(aws, "--region", REGION, "--instance_type", "ml.g5.xlarge")


@pytest.fixture(scope="module")
def two_host_job(aws):
    return launched_job(aws, "--region", REGION, "--instance_type", "ml.m5.xlarge", "--instance_count", "2")


def test_the_launched_job_has_the_image_instances_hyperparameters_data_and_source(aws, one_host_job):
    job = one_host_job
    assert job["AlgorithmSpecification"]["TrainingImage"].endswith("/pytorch-training:2.10-gpu-py313")
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 1
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 86400  # not the SDK's 3600 s
    assert job["RoleArn"] == ROLE
    # and the TensorBoard folder the launcher sets (tests/test_sagemaker_production.py)
    assert job["HyperParameters"] == HYPERPARAMETERS | {"tensorboard_dir": "/opt/ml/output/tensorboard"}
    assert channel(job, "training") == aws["data"]
    code = channel(job, "code")
    assert code.startswith(f"s3://{BUCKET}/")
    assert "monai" in s3_text(code + "/requirements.txt")
    assert s3_text(code + "/sagemaker_entry.py") == (REPO / "scripts" / "sagemaker_entry.py").read_text()
    assert s3_text(code + "/configs/train.json") == (REPO / "configs" / "train.json").read_text()
    train_script = s3_text(channel(job, "sm_drivers") + "/sm_train.sh")
    assert "distributed_drivers/torchrun_driver.py" in train_script
    source_code = json.loads(s3_text(channel(job, "sm_drivers") + "/sourcecode.json"))
    assert source_code["entry_script"] == "sagemaker_entry.py"


def test_torchrun_false_runs_one_plain_process(aws):
    job = launched_job(aws, "--torchrun", "false", "--instance_type", "ml.c5.2xlarge", "--gpus_per_instance", "1")
    train_script = s3_text(channel(job, "sm_drivers") + "/sm_train.sh")
    assert "basic_script_driver.py" in train_script and "torchrun_driver.py" not in train_script
    assert job["AlgorithmSpecification"]["TrainingImage"].endswith("/pytorch-training:2.10-cpu-py313")


def test_a_two_instance_job_uses_torchrun(two_host_job):
    assert two_host_job["ResourceConfig"]["InstanceCount"] == 2
    assert "torchrun_driver.py" in s3_text(channel(two_host_job, "sm_drivers") + "/sm_train.sh")


@pytest.mark.parametrize(
    "args, expected",
    [
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
    ],
)
def test_bad_launch_arguments_fail_before_anything_is_uploaded(aws, args, expected):
    import boto3

    before = boto3.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"]
    jobs = len(boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"])
    defaults = {"--data": aws["data"], "--role": ROLE, "--bucket": BUCKET}
    for flag, value in zip(args[::2], args[1::2], strict=True):
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

    assert (
        resolve_value_from_config(config_path=TELEMETRY_OPT_OUT_PATH, default_value=False, sagemaker_session=session)
        is True
    )


def load_model_dir(model_dir):
    """The adapter the PyTorch inference container imports from the model directory's code/."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("job_inference_adapter", model_dir / "code" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(model_dir / "code"))  # as the container does: code/bundle is importable
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(model_dir / "code"))
    return module


def classify(model_dir, image_bytes) -> dict:
    adapter = load_model_dir(model_dir)
    predictor = adapter.model_fn(str(model_dir))
    body, content_type = adapter.output_fn(
        adapter.predict_fn(adapter.input_fn(image_bytes, "image/jpeg"), predictor), "application/json"
    )
    assert content_type == "application/json"
    return json.loads(body)


def assert_complete_model_dir(model_dir):
    for path in (
        "configs/inference.json",
        "models/model.pt",
        "models/model.json",
        "code/inference.py",
        "code/requirements.txt",
        "code/bundle/predictor.py",
        "code/bundle/payloads.py",
    ):
        assert (model_dir / path).is_file(), path
    assert json.loads((model_dir / "models" / "model.json").read_text())["image_size"] == [32, 32]


@pytest.fixture(scope="module")
def real_image(synthetic_dir):
    """A real HAM10000 JPEG when HAM10000_DIR is set (CI sets it), else a synthetic one."""
    import os
    from pathlib import Path

    folder = Path(os.environ["HAM10000_DIR"]) if os.environ.get("HAM10000_DIR") else synthetic_dir
    return next(iter(sorted(folder.rglob("*.jpg")))).read_bytes()


@pytest.fixture(scope="module")
def one_host_container(one_host_job, tmp_path_factory):
    """The one-host job run as its container would: the SDK's sm_train.sh, then its torchrun_driver.py."""
    root = tmp_path_factory.mktemp("one_host")
    opt_ml = simulated_container(one_host_job, root, "algo-1", free_port())
    log = root / "container.log"
    container = start_container(opt_ml, one_host_job["TrainingJobName"], log)
    assert container.wait(timeout=600) == 0, log.read_text()[-6000:]
    return opt_ml, log.read_text()


def test_one_host_job_runs_through_the_sdk_torchrun_driver_and_leaves_a_complete_model_dir(one_host_container):
    opt_ml, output = one_host_container
    assert "torchrun --nnodes=1 --nproc_per_node=1" in output and "sagemaker_entry.py --epochs 1" in output
    assert_complete_model_dir(opt_ml / "model")
    plots = ("roc_curves.png", "confusion_matrix.png", "reliability.png", "training_curves.png", "ood_scores.png")
    for name in ("metrics.json", "predictions.csv", *plots, "history.json"):
        assert (opt_ml / "output" / "data" / name).is_file(), name
    assert "auc_macro" in json.loads((opt_ml / "output" / "data" / "metrics.json").read_text())


def test_the_job_model_dir_classifies_through_the_adapter_and_aws_inference_toolkit(
    one_host_container, real_image, tmp_path
):
    import requests

    model_dir = one_host_container[0] / "model"
    # the job trained on the synthetic set, so its guard may well flag a real HAM10000 image: either
    # answer is right, and the toolkit must give the one the adapter gives
    answer = classify(model_dir, real_image)
    assert_well_formed(answer)
    assert answer["ood_method"] == "mahalanobis", "the job's model dir ships no out-of-distribution guard"
    with inference_toolkit(model_dir, tmp_path) as url:
        served = requests.post(
            f"{url}/invocations", data=real_image, headers={"Content-Type": "image/jpeg"}, timeout=120
        )
    assert served.status_code == 200, served.text
    served = served.json()
    assert set(served) == set(answer)
    assert (served["class"], served["out_of_distribution"]) == (answer["class"], answer["out_of_distribution"])
    assert served["ood_score"] == pytest.approx(answer["ood_score"], rel=1e-4)
    if "probabilities" in answer:
        assert served["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-5)


def test_two_hosts_train_their_shards_and_only_rank_0_writes(two_host_job, tmp_path, real_image):
    port = free_port()
    containers, logs = {}, {}
    for host in ("algo-1", "algo-2"):
        opt_ml = simulated_container(two_host_job, tmp_path / host, host, port)
        logs[host] = tmp_path / f"{host}.log"
        containers[host] = (opt_ml, start_container(opt_ml, two_host_job["TrainingJobName"], logs[host]))
    try:  # every host must end on its own; only a failure stops the others
        for host, (_, process) in containers.items():
            assert process.wait(timeout=600) == 0, f"{host}:\n{logs[host].read_text()[-6000:]}"
    finally:
        for _, process in containers.values():
            if process.poll() is None:
                process.kill()
    worker_log = logs["algo-2"].read_text()
    assert "--nnodes=2" in worker_log and "--node_rank=1" in worker_log
    assert "training on 2 process(es)" in worker_log
    master, worker = containers["algo-1"][0], containers["algo-2"][0]
    assert_complete_model_dir(master / "model")
    assert not any((worker / "model").iterdir()) and not any((worker / "output" / "data").iterdir())
    assert_well_formed(classify(master / "model", real_image))


def run_entry(tmp_path, env_changes: dict, *args) -> subprocess.CompletedProcess:
    import os

    env = dict(
        os.environ,
        SM_MODEL_DIR=str(tmp_path / "model"),
        SM_OUTPUT_DATA_DIR=str(tmp_path / "output" / "data"),
        SM_OUTPUT_FAILURE=str(tmp_path / "output" / "failure"),
    )
    (tmp_path / "output").mkdir(exist_ok=True)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, "scripts/sagemaker_entry.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no channel", "no 'training' data channel (SM_CHANNEL_TRAINING is not set)"),
        ("empty channel", "is empty: the S3 prefix holds no files"),
        ("not HAM10000", "no metadata CSV in"),
        ("unknown hyperparameter", "unknown hyperparameter 'learningrate' (did you mean 'learning_rate'?)"),
        ("bad job setting", "hyperparameter 'val_frac' must be a float, not 'lots'"),
        ("dangling flag", "hyperparameter --epochs has no value"),
        ("hosts without torchrun", "2 hosts but no torchrun"),
    ],
)
def test_the_entry_script_refuses_bad_input_before_any_work(tmp_path, synthetic_dir, case, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dataset")
    env, args = {"SM_CHANNEL_TRAINING": str(synthetic_dir)}, ["--epochs", "1"]
    if case == "no channel":
        env["SM_CHANNEL_TRAINING"] = None
    elif case == "empty channel":
        env["SM_CHANNEL_TRAINING"] = str(tmp_path / "empty")
    elif case == "not HAM10000":
        env["SM_CHANNEL_TRAINING"] = str(tmp_path / "other")
    elif case == "unknown hyperparameter":
        args = ["--learningrate", "0.1"]
    elif case == "bad job setting":
        env["SM_HPS"] = json.dumps({"val_frac": "lots"})
    elif case == "dangling flag":
        args = ["--epochs"]
    elif case == "hosts without torchrun":
        env["SM_HOSTS"] = json.dumps(["algo-1", "algo-2"])
    result = run_entry(tmp_path, env, *args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr
    assert expected in (tmp_path / "output" / "failure").read_text()  # SageMaker shows it as the FailureReason
    assert not (tmp_path / "model").exists()


def test_the_containers_folders_are_absolute_whatever_folder_the_entry_starts_in(tmp_path, monkeypatch):
    """The bundle's runs start in the repository: a relative channel or checkpoint folder set by hand must
    still name the folder it named where the entry script was started."""
    from cloud.training_job import Container, checkpoint_dir

    monkeypatch.chdir(tmp_path)
    env = {"SM_MODEL_DIR": "model", "SM_OUTPUT_DATA_DIR": "output/data", "SM_CHANNEL_TRAINING": "data"}
    container = Container.from_env(env, [])
    assert (container.model_dir, container.output_data_dir, container.data_dir) == (
        tmp_path / "model",
        tmp_path / "output" / "data",
        tmp_path / "data",
    )
    assert checkpoint_dir(tmp_path / "work", {"checkpoint_dir": "checkpoints"}) == tmp_path / "checkpoints"


def test_resume_false_starts_a_job_over_once_and_its_restarts_resume(tmp_path):
    """SageMaker restarts a reclaimed spot job with the same hyperparameters: ``resume false`` must start the job
    over, not each of its restarts, while another job given the same folder starts over again."""
    from cloud.training_job import Container, restart_resumes

    def container(job: str, rank: int = 0) -> Container:
        env = {"SM_MODEL_DIR": "m", "SM_OUTPUT_DATA_DIR": "o", "TRAINING_JOB_NAME": job, "RANK": str(rank)}
        return Container.from_env(env, [])

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    earlier = folder / "checkpoint_last.pt"
    earlier.write_bytes(b"an earlier job's checkpoint")
    fresh = {"resume": "false", "max_epochs": "3"}
    assert restart_resumes(folder, fresh, container("job-a")) == fresh
    assert restart_resumes(folder, fresh, container("job-a", rank=1)) == fresh
    assert not earlier.exists(), "a restart inside the first epoch must not resume the earlier checkpoint"
    for rank in (0, 1):  # the restart: both ranks resume what the job checkpointed since
        assert restart_resumes(folder, fresh, container("job-a", rank)) == fresh | {"resume": "true"}
    assert restart_resumes(folder, fresh, container("job-b")) == fresh
    assert restart_resumes(folder, {"max_epochs": "3"}, container("job-c")) == {"max_epochs": "3"}
