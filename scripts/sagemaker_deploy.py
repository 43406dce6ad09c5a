"""Serve a trained model on SageMaker: real-time endpoints, batch transform, and tearing down.

    python scripts/sagemaker_deploy.py deploy --model MODEL.tar.gz|s3://... [--endpoint skin-lesion]
        [--instance_type ml.m5.xlarge --instance_count 1] [--image URI] [--autoscale 1,4 --invocations_per_instance 100]
        [--wait] [--role ARN --region R --bucket B]
    python scripts/sagemaker_deploy.py transform --model MODEL.tar.gz|s3://...
        --input s3://B/images/ --output s3://B/predictions/
        [--instance_type ml.m5.xlarge --instance_count 1] [--image URI] [--wait] [--role ARN --region R --bucket B]
    python scripts/sagemaker_deploy.py delete --endpoint skin-lesion [--region R]
    python scripts/sagemaker_deploy.py delete_model --model_name NAME [--region R]

``--model`` is a training job's model artifact (``scripts/sagemaker_train.py`` prints its S3 URI) or
``dist/model.tar.gz`` from ``scripts/package_sagemaker.py`` (uploaded to ``--bucket`` first). Without
``--image`` it runs on AWS's PyTorch inference container (``code/inference.py`` in the archive); with
``--image`` on that image instead, e.g. the bring-your-own container built from ``docker/Dockerfile``
(which serves the archive's model: a ``.mar`` in it, or the archive itself in place; the ``.mar`` baked into the
image only for a model without an archive). ``--autoscale MIN,MAX`` registers
the endpoint's variant with Application Auto Scaling and tracks ``--invocations_per_instance``
(SageMakerVariantInvocationsPerInstance); it waits for the endpoint, as registering needs it in service.
``transform`` sends each object under ``--input`` (one image each) to the model and writes one JSON
answer per image under ``--output`` as ``<name>.out``. Every argument is checked before anything is
uploaded or created.
"""

import re
import sys
import tarfile
import time
from pathlib import Path

import fire

from cloud import aws

# Each deploy's model is named <endpoint>-<UTC time to the second> (16 characters more), and model names end at 63
ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,46}$")
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_METRIC = "SageMakerVariantInvocationsPerInstance"
# Sent to the model for every transform record: the adapter sniffs JPEG or PNG from the bytes.
TRANSFORM_CONTENT_TYPE = "application/x-image"


def deploy(
    model: str,
    endpoint: str = "skin-lesion",
    instance_type: str = "ml.m5.xlarge",
    instance_count: int = 1,
    image: str = None,
    autoscale: tuple = None,
    invocations_per_instance: float = 100.0,
    wait: bool = False,
    role: str = None,
    region: str = None,
    bucket: str = None,
) -> None:
    """Create a model, an endpoint config and a real-time endpoint named ``endpoint``.

    The model and its uploaded archive are named after the endpoint and the time, so that nothing a running
    endpoint reads is overwritten. An endpoint of that name must not exist yet: delete it first. When creating
    the endpoint fails (an instance quota of 0 is the usual first one), the model and endpoint config this run
    created are deleted again, so that a retry starts clean.
    """
    try:
        if not ENDPOINT_NAME.match(str(endpoint)):
            raise aws.SetupError(
                f"--endpoint {endpoint!r} is not a valid endpoint name (letters, digits, hyphens; at most 47 "
                "characters: its models are named <endpoint>-<time>)"
            )
        scaling = _autoscale_range(autoscale, instance_count)
        if invocations_per_instance <= 0:
            raise aws.SetupError(f"--invocations_per_instance must be above 0, not {invocations_per_instance!r}")
        target = _target(model, role, region, bucket, instance_type, "endpoint", instance_count, wait, image)
        _require_no_endpoint(endpoint, target["region"])
    except aws.SetupError as error:
        sys.exit(f"error: {error}")
    builder = _builder(target, _release_name(endpoint))
    session = builder.sagemaker_session
    try:
        builder.deploy(
            endpoint_name=endpoint, initial_instance_count=instance_count, instance_type=instance_type, wait=False
        )
    except Exception as error:
        _remove_created(session.boto_session.client("sagemaker"), endpoint, builder.built_model.model_name)
        sys.exit(f"error: creating endpoint {endpoint} failed, and what this run created was deleted: {error}")
    if target["wait"] or scaling:  # registering with autoscaling needs the endpoint in service
        session.boto_session.client("sagemaker").get_waiter("endpoint_in_service").wait(EndpointName=endpoint)
    print(f"endpoint: {endpoint} (model {builder.built_model.model_name}, image {builder.image_uri})")
    if scaling:
        variants = _register_autoscaling(session, endpoint, *scaling, invocations_per_instance)
        print(
            f"autoscaling {', '.join(variants)}: {scaling[0]} to {scaling[1]} instances, "
            f"{invocations_per_instance:g} invocations per instance per minute"
        )
    print(f"classify: python scripts/predict.py IMAGE --endpoint {endpoint} --region {target['region']}")


def transform(
    model: str,
    input: str,
    output: str,
    instance_type: str = "ml.m5.xlarge",
    instance_count: int = 1,
    image: str = None,
    wait: bool = False,
    role: str = None,
    region: str = None,
    bucket: str = None,
) -> None:
    """Run a batch transform job over every image under ``input``, writing one answer per image under ``output``."""
    try:
        aws.s3_uri(input, "--input")
        aws.s3_uri(output, "--output")
        target = _target(model, role, region, bucket, instance_type, "transform", instance_count, wait, image)
    except aws.SetupError as error:
        sys.exit(f"error: {error}")
    builder = _builder(target, _release_name("skin-lesion-transform"))
    from sagemaker.core.transformer import Transformer

    transformer = Transformer(
        model_name=builder.built_model.model_name,
        instance_count=instance_count,
        instance_type=instance_type,
        output_path=output,
        accept="application/json",
        strategy="SingleRecord",
        assemble_with="None",
        sagemaker_session=builder.sagemaker_session,
        base_transform_job_name="skin-lesion",
    )
    transformer.transform(
        data=input,
        data_type="S3Prefix",
        content_type=TRANSFORM_CONTENT_TYPE,
        split_type="None",
        wait=target["wait"],
        logs=target["wait"],
    )
    print(
        f"transform job: {transformer._current_job_name} (model {builder.built_model.model_name}); "
        f"answers: {output.rstrip('/')}/<image name>.out"
    )
    print(
        f"remove the model afterwards: python scripts/sagemaker_deploy.py delete_model "
        f"--model_name {builder.built_model.model_name} --region {target['region']}"
    )


def delete(endpoint: str, region: str = None) -> None:
    """Delete the endpoint, its endpoint config, its models and their autoscaling registration."""
    try:
        region = aws.region(region)
    except aws.SetupError as error:
        sys.exit(f"error: {error}")
    import boto3
    from botocore.exceptions import ClientError

    aws.opt_out_of_telemetry()
    client = boto3.client("sagemaker", region_name=region)
    try:
        config_name = client.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except ClientError as error:
        sys.exit(f"error: endpoint {endpoint!r} in {region}: {error.response['Error'].get('Message', error)}")
    variants = client.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"]
    scaling = boto3.client("application-autoscaling", region_name=region)
    for variant in variants:
        resource = f"endpoint/{endpoint}/variant/{variant['VariantName']}"
        registered = scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[resource], ScalableDimension=SCALABLE_DIMENSION
        )["ScalableTargets"]
        for policy in scaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION
        )["ScalingPolicies"]:
            scaling.delete_scaling_policy(
                PolicyName=policy["PolicyName"],
                ServiceNamespace="sagemaker",
                ResourceId=resource,
                ScalableDimension=SCALABLE_DIMENSION,
            )
        if registered:
            scaling.deregister_scalable_target(
                ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION
            )
    client.delete_endpoint(EndpointName=endpoint)
    client.delete_endpoint_config(EndpointConfigName=config_name)
    models = sorted({variant["ModelName"] for variant in variants})
    for name in models:
        client.delete_model(ModelName=name)
    print(f"deleted endpoint {endpoint}, endpoint config {config_name}, model(s) {', '.join(models)}")


def delete_model(model_name: str, region: str = None) -> None:
    """Delete a model (e.g. the one a transform job created)."""
    try:
        region = aws.region(region)
    except aws.SetupError as error:
        sys.exit(f"error: {error}")
    import boto3

    boto3.client("sagemaker", region_name=region).delete_model(ModelName=model_name)
    print(f"deleted model {model_name}")


def _release_name(prefix: str) -> str:
    """The name of one deploy's model (and of its uploaded archive's folder): ``prefix`` and the UTC time."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _require_no_endpoint(endpoint: str, region: str) -> None:
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("sagemaker", region_name=region)
    try:
        config = client.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except ClientError as error:
        if error.response["Error"].get("Code") == "ValidationException":  # what AWS says for an unknown endpoint
            return
        raise aws.SetupError(f"cannot look up endpoint {endpoint!r} in {region}: {error}") from None
    raise aws.SetupError(
        f"endpoint {endpoint!r} already exists in {region} (endpoint config {config}): delete it first (python "
        f"scripts/sagemaker_deploy.py delete --endpoint {endpoint} --region {region}) or choose another --endpoint"
    )


def _remove_created(client, endpoint: str, model_name: str) -> None:
    """The endpoint config (named after the endpoint by the SDK) and the model of a deploy whose endpoint failed."""
    from botocore.exceptions import ClientError

    for remove, arguments in [
        (client.delete_endpoint_config, {"EndpointConfigName": endpoint}),
        (client.delete_model, {"ModelName": model_name}),
    ]:
        try:
            remove(**arguments)
        except ClientError:  # not created before the failure
            pass


def _autoscale_range(autoscale, instance_count) -> tuple[int, int] | None:
    if autoscale is None:
        return None
    values = tuple(autoscale) if isinstance(autoscale, (tuple, list)) else ()
    if (
        len(values) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        or not 1 <= values[0] <= values[1]
    ):
        raise aws.SetupError(f"--autoscale takes MIN,MAX instance counts with 1 <= MIN <= MAX, not {autoscale!r}")
    if not values[0] <= instance_count <= values[1]:
        raise aws.SetupError(f"--instance_count {instance_count} is outside --autoscale {values[0]},{values[1]}")
    return values


def _target(model, role, region, bucket, instance_type, kind, instance_count, wait, image) -> dict:
    """Checked settings; a local archive must exist and be a tar. The bucket defaults to the model's; the image to
    AWS's PyTorch inference container for the region and instance type, looked up here, before any upload."""
    aws.instance_count(instance_count)
    aws.instance_type(instance_type, kind)
    if str(model).lower().startswith("s3:") or "://" in str(model):  # meant as a URI: must be an S3 one
        model_bucket, _ = aws.s3_uri(model, "--model")
    else:
        path = Path(model)
        if not path.is_file():
            raise aws.SetupError(
                f"--model {model} not found: a model.tar.gz (from scripts/package_sagemaker.py) "
                "or the S3 URI of a training job's model artifact"
            )
        if not tarfile.is_tarfile(path):
            raise aws.SetupError(f"--model {model} is not a tar archive")
        model_bucket = None
    region_name = aws.region(region)
    if image is None:
        try:
            image = aws.pytorch_image(region_name, instance_type, "inference")
        except ValueError as error:  # the SDK's tables have no such image (an Inferentia type, a region without it)
            raise aws.SetupError(f"no PyTorch inference image for {instance_type} in {region_name}: {error}") from None
    return {
        "model": str(model),
        "instance_type": instance_type,
        "image": image,
        "role": aws.role(role),
        "region": region_name,
        "bucket": aws.bucket(bucket or model_bucket),
        "wait": aws.boolean(wait, "--wait"),
    }


def _builder(target: dict, model_name: str):
    """A built ModelBuilder for the archive (uploaded first when local, under the model's name) on the target image."""
    session = aws.session(target["region"], target["bucket"])
    model = target["model"]
    if not model.startswith("s3://"):
        key = f"skin-lesion/models/{model_name}/model.tar.gz"
        session.boto_session.client("s3").upload_file(model, target["bucket"], key)
        model = f"s3://{target['bucket']}/{key}"
    from sagemaker.serve import ModelBuilder

    # s3_model_data_url explicitly: otherwise the SDK's repack step reads an empty prefix and fails (404)
    builder = ModelBuilder(
        s3_model_data_url=model,
        role_arn=target["role"],
        sagemaker_session=session,
        image_uri=target["image"],
    )
    builder.build(model_name=model_name)
    return builder


def _register_autoscaling(session, endpoint: str, minimum: int, maximum: int, per_instance: float) -> list[str]:
    sagemaker = session.boto_session.client("sagemaker")
    config = sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    variants = [
        v["VariantName"] for v in sagemaker.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
    ]
    scaling = session.boto_session.client("application-autoscaling")
    for variant in variants:
        resource = f"endpoint/{endpoint}/variant/{variant}"
        scaling.register_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=resource,
            ScalableDimension=SCALABLE_DIMENSION,
            MinCapacity=minimum,
            MaxCapacity=maximum,
        )
        scaling.put_scaling_policy(
            PolicyName=f"{endpoint}-invocations",
            ServiceNamespace="sagemaker",
            ResourceId=resource,
            ScalableDimension=SCALABLE_DIMENSION,
            PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": float(per_instance),
                "PredefinedMetricSpecification": {"PredefinedMetricType": SCALING_METRIC},
                "ScaleInCooldown": 300,
                "ScaleOutCooldown": 60,
            },
        )
    return variants


if __name__ == "__main__":
    fire.Fire({"deploy": deploy, "transform": transform, "delete": delete, "delete_model": delete_model})
