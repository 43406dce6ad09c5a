"""scripts/sagemaker_deploy.py against a local moto server: deploy (with autoscaling), batch transform and
delete create and remove the real resources; bad arguments are refused before anything is uploaded."""

import re
import subprocess
import sys

import pytest

from tests.aws_local import BUCKET, ROLE, local_aws, recording_hooks, require, upload_folder
from tests.bundle_runs import REPO
from tests.serving import bundle_with_random_weights

INFERENCE_IMAGE = "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-inference:2.6-cpu-py312"
BYOC_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/skin-lesion-torchserve:latest"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    # The CLI runs in its own process: moto's empty VpcConfig/DataCaptureConfig are stripped there too.
    hooks = recording_hooks(tmp_path_factory.mktemp("hooks"))
    with local_aws(tmp_path_factory.mktemp("aws")) as env:
        env.update(hooks)
        require("sagemaker.serve")  # within the region: importing it without one raises NoRegionError
        yield env


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=[32, 32])
    output = root / "model.tar.gz"
    packaged = subprocess.run(
        [sys.executable, "scripts/package_sagemaker.py", "--bundle_root", str(root), "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert packaged.returncode == 0, packaged.stderr
    return output


def deploy_cli(aws, *args, expect_ok=True) -> subprocess.CompletedProcess:
    import os

    result = subprocess.run(
        [sys.executable, "scripts/sagemaker_deploy.py", *args],
        cwd=REPO,
        env=dict(os.environ, **aws),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (result.returncode == 0) == expect_ok, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def sagemaker():
    import boto3

    return boto3.client("sagemaker")


def scaling():
    import boto3

    return boto3.client("application-autoscaling")


def registered(resource: str) -> list[dict]:
    return scaling().describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])["ScalableTargets"]


def policies(resource: str) -> list[dict]:
    return scaling().describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]


def bucket_keys() -> list[str]:
    import boto3

    return [item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def test_deploy_with_autoscaling_then_delete_removes_everything(aws, archive):
    result = deploy_cli(
        aws,
        "deploy",
        "--model",
        str(archive),
        "--endpoint",
        "lesions-rt",
        "--role",
        ROLE,
        "--bucket",
        BUCKET,
        "--instance_type",
        "ml.c5.xlarge",
        "--instance_count",
        "2",
        "--autoscale",
        "1,4",
        "--invocations_per_instance",
        "50",
    )
    assert "classify: python scripts/predict.py IMAGE --endpoint lesions-rt --region eu-west-1" in result.stdout
    endpoint = sagemaker().describe_endpoint(EndpointName="lesions-rt")
    config = sagemaker().describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    (variant,) = config["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.xlarge", 2)
    model = sagemaker().describe_model(ModelName=variant["ModelName"])
    container = model.get("PrimaryContainer") or model["Containers"][0]
    assert container["Image"] == INFERENCE_IMAGE
    # named after the endpoint and the time: a later deploy uploads beside this archive, never over it
    assert re.fullmatch(r"lesions-rt-\d{8}-\d{6}", variant["ModelName"]), variant["ModelName"]
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/skin-lesion/models/{variant['ModelName']}/model.tar.gz"
    assert model["ExecutionRoleArn"] == ROLE
    assert container["ModelDataUrl"].removeprefix(f"s3://{BUCKET}/") in bucket_keys()
    # a second deploy under the same name is refused before it uploads or creates anything
    keys, models = bucket_keys(), sagemaker().list_models()["Models"]
    again = deploy_cli(aws, "deploy", "--model", str(archive), "--endpoint", "lesions-rt", "--role", ROLE,
                       "--bucket", BUCKET, expect_ok=False)  # fmt: skip
    assert (
        "error: endpoint 'lesions-rt' already exists in eu-west-1" in again.stderr and "delete it first" in again.stderr
    )
    assert bucket_keys() == keys and sagemaker().list_models()["Models"] == models
    resource = f"endpoint/lesions-rt/variant/{variant['VariantName']}"
    (target,) = registered(resource)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    (policy,) = policies(resource)
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 50
    metric = tracking["PredefinedMetricSpecification"]["PredefinedMetricType"]
    assert metric == "SageMakerVariantInvocationsPerInstance"

    deleted = deploy_cli(aws, "delete", "--endpoint", "lesions-rt")
    assert "deleted endpoint lesions-rt" in deleted.stdout
    assert not [e for e in sagemaker().list_endpoints()["Endpoints"] if e["EndpointName"] == "lesions-rt"]
    assert not [
        c
        for c in sagemaker().list_endpoint_configs()["EndpointConfigs"]
        if c["EndpointConfigName"] == endpoint["EndpointConfigName"]
    ]
    assert not [m for m in sagemaker().list_models()["Models"] if m["ModelName"] == variant["ModelName"]]
    assert not registered(resource) and not policies(resource)


def test_a_training_artifact_in_s3_deploys_on_the_byoc_image_without_a_bucket_argument(aws, archive, tmp_path):
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "model.tar.gz").write_bytes(archive.read_bytes())
    artifact = upload_folder(tmp_path / "artifact", BUCKET, "skin-lesion/output/job-1/output") + "model.tar.gz"
    before = len(bucket_keys())
    deploy_cli(aws, "deploy", "--model", artifact, "--endpoint", "lesions-byoc", "--image", BYOC_IMAGE, "--role", ROLE)
    assert len(bucket_keys()) == before  # nothing uploaded: the artifact is used where it is
    endpoint = sagemaker().describe_endpoint(EndpointName="lesions-byoc")
    config = sagemaker().describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    (variant,) = config["ProductionVariants"]
    model = sagemaker().describe_model(ModelName=variant["ModelName"])
    container = model.get("PrimaryContainer") or model["Containers"][0]
    assert (container["Image"], container["ModelDataUrl"]) == (BYOC_IMAGE, artifact)
    deploy_cli(aws, "delete", "--endpoint", "lesions-byoc")
    assert not [e for e in sagemaker().list_endpoints()["Endpoints"] if e["EndpointName"] == "lesions-byoc"]


def test_batch_transform_over_a_prefix_then_its_model_is_deleted(aws, archive):
    result = deploy_cli(
        aws,
        "transform",
        "--model",
        str(archive),
        "--input",
        f"s3://{BUCKET}/incoming/",
        "--output",
        f"s3://{BUCKET}/predictions/",
        "--role",
        ROLE,
        "--bucket",
        BUCKET,
        "--instance_type",
        "ml.m5.2xlarge",
        "--instance_count",
        "2",
    )
    job_name = result.stdout.split("transform job: ")[1].split()[0]
    job = sagemaker().describe_transform_job(TransformJobName=job_name)
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/incoming/"
    assert job["TransformInput"]["ContentType"] == "application/x-image"
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://{BUCKET}/predictions/"
    resources = job["TransformResources"]
    assert (resources["InstanceType"], resources["InstanceCount"]) == ("ml.m5.2xlarge", 2)
    model = sagemaker().describe_model(ModelName=job["ModelName"])
    assert (model.get("PrimaryContainer") or model["Containers"][0])["Image"] == INFERENCE_IMAGE
    deploy_cli(aws, "delete_model", "--model_name", job["ModelName"])
    assert not [m for m in sagemaker().list_models()["Models"] if m["ModelName"] == job["ModelName"]]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["deploy", "--instance_type", "ml.m5.huge"], "unknown endpoint instance type 'ml.m5.huge'"),
        (
            ["deploy", "--instance_count", "0"],
            "--instance_count must be a whole number of instances, at least 1, not 0",
        ),
        (["deploy", "--autoscale", "4,1"], "--autoscale takes MIN,MAX instance counts with 1 <= MIN <= MAX"),
        (["deploy", "--autoscale", "2,4"], "--instance_count 1 is outside --autoscale 2,4"),
        (["deploy", "--endpoint", "bad_name!"], "--endpoint 'bad_name!' is not a valid endpoint name"),
        (["deploy", "--endpoint", "a" * 48], "at most 47 characters: its models are named <endpoint>-<time>"),
        (["deploy", "--instance_type", "ml.inf2.xlarge"], "no PyTorch inference image for ml.inf2.xlarge in eu-west-1"),
        (["deploy", "--model", "missing.tar.gz"], "--model missing.tar.gz not found"),
        (["deploy", "--model", "README.md"], "--model README.md is not a tar archive"),
        (["deploy", "--model", "s3:/bucket/model.tar.gz"], "--model 's3:/bucket/model.tar.gz' is not an S3 URI"),
        (["deploy", "--role", ""], "no IAM role for SageMaker: pass --role or set SAGEMAKER_ROLE_ARN"),
        (["deploy", "--bucket", ""], "no S3 bucket for code and artifacts: pass --bucket or set SAGEMAKER_BUCKET"),
        (["transform", "--input", "incoming/"], "--input 'incoming/' is not an S3 URI"),
        (["transform", "--output", "https://example.com/out"], "--output 'https://example.com/out' is not an S3 URI"),
        (["transform", "--instance_type", "ml.t2.medium"], "unknown transform instance type 'ml.t2.medium'"),
    ],
)
def test_bad_arguments_fail_before_anything_is_uploaded_or_created(aws, archive, args, expected):
    command, *rest = args
    options = {"--model": str(archive), "--role": ROLE, "--bucket": BUCKET}
    if command == "transform":
        options |= {"--input": f"s3://{BUCKET}/incoming/", "--output": f"s3://{BUCKET}/predictions/"}
    for flag, value in zip(rest[::2], rest[1::2], strict=True):
        options[flag] = value
    keys, models = bucket_keys(), sagemaker().list_models()["Models"]
    result = deploy_cli(
        aws, command, *[item for pair in options.items() if pair[1] != "" for item in pair], expect_ok=False
    )
    assert expected in result.stderr, result.stderr[-3000:]
    assert bucket_keys() == keys and sagemaker().list_models()["Models"] == models


def test_deleting_an_unknown_endpoint_says_so(aws):
    result = deploy_cli(aws, "delete", "--endpoint", "no-such-endpoint", expect_ok=False)
    assert "error: endpoint 'no-such-endpoint' in eu-west-1" in result.stderr


def test_a_deploy_whose_endpoint_cannot_be_created_deletes_what_it_created(aws, archive, tmp_path):
    no_quota = {**aws, **recording_hooks(tmp_path, no_quota=True)}
    models = sagemaker().list_models()["Models"]
    result = deploy_cli(no_quota, "deploy", "--model", str(archive), "--endpoint", "lesions-quota", "--role", ROLE,
                        "--bucket", BUCKET, "--instance_type", "ml.c5.xlarge", expect_ok=False)  # fmt: skip
    assert "error: creating endpoint lesions-quota failed, and what this run created was deleted" in result.stderr
    assert "ResourceLimitExceeded" in result.stderr
    assert sagemaker().list_models()["Models"] == models
    assert not [
        c for c in sagemaker().list_endpoint_configs()["EndpointConfigs"] if "lesions-quota" in c["EndpointConfigName"]
    ]
    deploy_cli(aws, "deploy", "--model", str(archive), "--endpoint", "lesions-quota", "--role", ROLE, "--bucket",
               BUCKET, "--instance_type", "ml.c5.xlarge")  # fmt: skip
    deploy_cli(aws, "delete", "--endpoint", "lesions-quota")
