"""What the launch and deploy scripts share: settings from arguments or the environment, the checks
that run before anything is uploaded, the SageMaker session and the container images.

No credentials live here: boto3 finds them as usual (environment, ~/.aws, an instance role). The role
ARN, region and bucket come from arguments or SAGEMAKER_ROLE_ARN, AWS_REGION / AWS_DEFAULT_REGION and
SAGEMAKER_BUCKET. The SDK's telemetry is opted out before it is imported.
"""

from __future__ import annotations

import os
import re
import tempfile
from functools import cache
from pathlib import Path

from bundle.atomic import atomic_write

# Newest PyTorch images this SDK release knows: training 2.10 (py313); inference 2.6 (py312, the last
# inference image). Pass an image URI to use another (e.g. the 2.13 training image by its URI).
TRAINING_FRAMEWORK = ("2.10", "py313")
INFERENCE_FRAMEWORK = ("2.6", "py312")
ROLE_ENV, BUCKET_ENV, REGION_ENVS = "SAGEMAKER_ROLE_ARN", "SAGEMAKER_BUCKET", ("AWS_REGION", "AWS_DEFAULT_REGION")
S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<key>.*))?$")
ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
TELEMETRY_OPT_OUT = "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"
# The instance types the SageMaker API accepts for each kind of work (botocore's service model).
INSTANCE_SHAPES = {
    "training": "TrainingInstanceType",
    "endpoint": "ProductionVariantInstanceType",
    "transform": "TransformInstanceType",
}


class SetupError(ValueError):
    """A missing or malformed setting, found before anything is uploaded or launched."""


def setting(value: str | None, env_names: tuple[str, ...], what: str, flag: str) -> str:
    """``value``, else the first of ``env_names`` that is set; a SetupError naming both when neither is."""
    for candidate in (value, *(os.environ.get(name) for name in env_names)):
        if candidate:
            return str(candidate)
    raise SetupError(f"no {what}: pass {flag} or set {' or '.join(env_names)}")


def region(value: str | None = None) -> str:
    return setting(value, REGION_ENVS, "AWS region", "--region")


def role(value: str | None = None) -> str:
    arn = setting(value, (ROLE_ENV,), "IAM role for SageMaker", "--role")
    if not ROLE_ARN.match(arn):
        raise SetupError(f"--role {arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return arn


def bucket(value: str | None = None) -> str:
    name = setting(value, (BUCKET_ENV,), "S3 bucket for code and artifacts", "--bucket")
    if not S3_URI.match(f"s3://{name}"):
        raise SetupError(f"--bucket {name!r} is not an S3 bucket name")
    return name


def s3_uri(uri: str, what: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://bucket/key`` URI; a SetupError saying which argument when it is not one."""
    match = S3_URI.match(str(uri))
    if not match:
        raise SetupError(f"{what} {uri!r} is not an S3 URI (s3://bucket/prefix)")
    return match["bucket"], match["key"] or ""


def instance_type(name: str, kind: str) -> str:
    known = _instance_types(kind)
    if name not in known:
        family = str(name).rsplit(".", 1)[0]
        similar = sorted(t for t in known if t.startswith(family + "."))[:8]
        hint = f"; {family} offers {', '.join(similar)}" if similar else " (e.g. ml.m5.xlarge, ml.g5.xlarge)"
        raise SetupError(f"unknown {kind} instance type {name!r}{hint}")
    return name


@cache
def _instance_types(kind: str) -> frozenset[str]:
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return frozenset(model.shape_for(INSTANCE_SHAPES[kind]).enum)


def instance_count(count, what: str = "--instance_count") -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SetupError(f"{what} must be a whole number of instances, at least 1, not {count!r}")
    return count


def boolean(value, flag: str) -> bool:
    """A yes/no argument: fire passes ``--flag false`` on as the string 'false', which would count as true."""
    if isinstance(value, bool):
        return value
    parsed = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}.get(str(value).lower())
    if parsed is None:
        raise SetupError(f"{flag} takes true or false, not {value!r}")
    return parsed


def opt_out_of_telemetry() -> None:
    """Point the SDK at a config that opts out of telemetry (unless the user named a config of their own).

    Call before importing sagemaker: it reads the config when its modules load.
    """
    if os.environ.get("SAGEMAKER_USER_CONFIG_OVERRIDE"):
        return
    path = Path(tempfile.gettempdir()) / "skin-lesion-sagemaker-config.yaml"
    if not path.is_file() or path.read_text() != TELEMETRY_OPT_OUT:
        atomic_write(path, lambda partial: partial.write_text(TELEMETRY_OPT_OUT))
    os.environ["SAGEMAKER_USER_CONFIG_OVERRIDE"] = str(path)


def session(region_name: str, bucket_name: str):
    """A SageMaker session in ``region_name`` staging code and artifacts in ``bucket_name``."""
    opt_out_of_telemetry()
    import boto3
    from sagemaker.core.helper.session_helper import Session

    return Session(boto_session=boto3.Session(region_name=region_name), default_bucket=bucket_name)


def pytorch_image(region_name: str, instance: str, scope: str) -> str:
    """The AWS PyTorch Deep Learning Container for ``scope`` ('training' or 'inference'), from the SDK's tables."""
    opt_out_of_telemetry()
    from sagemaker.core import image_uris

    version, python = TRAINING_FRAMEWORK if scope == "training" else INFERENCE_FRAMEWORK
    return image_uris.retrieve(
        "pytorch", region=region_name, version=version, py_version=python, instance_type=instance, image_scope=scope
    )
