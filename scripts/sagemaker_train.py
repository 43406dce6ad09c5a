"""Launch the bundle as a SageMaker training job (SDK v3 ``ModelTrainer``).

    python scripts/sagemaker_train.py --data s3://BUCKET/ham10000/ [--role ARN --region R --bucket B]
        [--instance_type ml.g5.xlarge --instance_count 1 --gpus_per_instance N --torchrun true]
        [--image URI] [--max_runtime_s 86400 --volume_gb 50 --prefix skin-lesion] [--wait]
        [--epochs 30 --image_size "[224,224]" --batch_size 256 --learning_rate 0.001 --imbalance loss ...]

``--data`` is the HAM10000 folder in S3 (metadata CSV plus images, either layout), the job's 'training'
channel. Every other ``--key value`` is a hyperparameter for ``scripts/sagemaker_entry.py`` (checked
here, before anything is uploaded). The bundle (configs/, bundle/, cloud/, the entry script and the
container's requirements) goes up as the job's source code. With ``--torchrun`` (the default) the
SDK's torchrun driver starts one process per GPU (``--gpus_per_instance`` to choose) on every
instance; ``--torchrun false`` runs one plain process. The image defaults to AWS's PyTorch training
container for the instance type. Prints the job name and the model artifact's S3 URI, which
``scripts/sagemaker_deploy.py deploy`` takes as it is.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import fire

from cloud import aws
from cloud.hyperparameters import HyperparameterError, as_strings, split

REPO = Path(__file__).resolve().parents[1]

# The entry script sits at the source root in the container, so Python puts the root, with bundle/
# and cloud/ beside it, on the import path: nothing is installed there but the requirements.
ENTRY_SCRIPT = "sagemaker_entry.py"
# The training job's source code, by its path there: what the entry script and the bundle run need.
SOURCE = {
    "configs": "configs",
    "bundle": "bundle",
    "cloud": "cloud",
    "handler": "handler",
    ENTRY_SCRIPT: "scripts/sagemaker_entry.py",
}
# Installed by the SDK's driver in the training container, whose image brings torch.
CONTAINER_REQUIREMENTS = "monai[fire,pillow,ignite,tqdm,tensorboard]==1.6.1\nmatplotlib\n"
CHANNEL = "training"


def stage_source(folder: Path) -> Path:
    """Copy the job's source code into ``folder``, with its requirements.txt."""
    for name, path in SOURCE.items():
        source, target = REPO / path, folder / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    (folder / "requirements.txt").write_text(CONTAINER_REQUIREMENTS)
    return folder


def launch(
    data: str,
    role: str = None,
    region: str = None,
    bucket: str = None,
    instance_type: str = "ml.g5.xlarge",
    instance_count: int = 1,
    gpus_per_instance: int = None,
    torchrun: bool = True,
    image: str = None,
    max_runtime_s: int = 86400,
    volume_gb: int = 50,
    prefix: str = "skin-lesion",
    wait: bool = False,
    **hyperparameters,
) -> None:
    """Check everything, upload the bundle and start the training job; print its name and model artifact."""
    try:
        job = _checked(
            data,
            role,
            region,
            bucket,
            instance_type,
            instance_count,
            gpus_per_instance,
            torchrun,
            max_runtime_s,
            hyperparameters,
        )
        wait = aws.boolean(wait, "--wait")
    except (aws.SetupError, HyperparameterError) as error:
        sys.exit(f"error: {error}")
    name, artifact = start(job, image, volume_gb, prefix, wait)
    print(f"training job: {name}")
    print(f"model artifact: {artifact}")


def _checked(
    data,
    role,
    region,
    bucket,
    instance_type,
    instance_count,
    gpus_per_instance,
    torchrun,
    max_runtime_s,
    hyperparameters,
) -> dict:
    """Every argument checked, before anything is uploaded; a SetupError or HyperparameterError otherwise."""
    aws.s3_uri(data, "--data")
    torchrun = aws.boolean(torchrun, "--torchrun")
    instance_count = aws.instance_count(instance_count)
    if gpus_per_instance is not None:
        aws.instance_count(gpus_per_instance, "--gpus_per_instance")
    if instance_count > 1 and not torchrun:
        raise aws.SetupError("--instance_count above 1 needs --torchrun: without it each instance trains alone")
    if isinstance(max_runtime_s, bool) or not isinstance(max_runtime_s, int) or max_runtime_s < 60:
        raise aws.SetupError(f"--max_runtime_s must be a whole number of seconds, at least 60, not {max_runtime_s!r}")
    split(hyperparameters)
    return {
        "data": data,
        "role": aws.role(role),
        "region": aws.region(region),
        "bucket": aws.bucket(bucket),
        "instance_type": aws.instance_type(instance_type, "training"),
        "instance_count": instance_count,
        "gpus_per_instance": gpus_per_instance,
        "torchrun": torchrun,
        "max_runtime_s": max_runtime_s,
        "hyperparameters": as_strings(hyperparameters),
    }


def start(job: dict, image: str | None, volume_gb: int, prefix: str, wait: bool) -> tuple[str, str]:
    """Upload the source and create the job; return its name and its model artifact's S3 URI."""
    session = aws.session(job["region"], job["bucket"])
    from sagemaker.core.training.configs import Compute, InputData, OutputDataConfig, SourceCode, StoppingCondition
    from sagemaker.train import ModelTrainer
    from sagemaker.train.distributed import Torchrun

    output_path = f"s3://{job['bucket']}/{prefix}/output"
    with tempfile.TemporaryDirectory(prefix="skin-lesion-source-") as folder:
        trainer = ModelTrainer(
            sagemaker_session=session,
            role=job["role"],
            base_job_name=prefix,
            training_image=image or aws.pytorch_image(job["region"], job["instance_type"], "training"),
            source_code=SourceCode(
                source_dir=str(stage_source(Path(folder))), entry_script=ENTRY_SCRIPT, requirements="requirements.txt"
            ),
            distributed=Torchrun(process_count_per_node=job["gpus_per_instance"]) if job["torchrun"] else None,
            compute=Compute(
                instance_type=job["instance_type"], instance_count=job["instance_count"], volume_size_in_gb=volume_gb
            ),
            stopping_condition=StoppingCondition(max_runtime_in_seconds=job["max_runtime_s"]),
            output_data_config=OutputDataConfig(s3_output_path=output_path),
            hyperparameters=job["hyperparameters"],
        )
        trainer.train(
            input_data_config=[InputData(channel_name=CHANNEL, data_source=job["data"])], wait=wait, logs=wait
        )
    training_job = trainer._latest_training_job  # the SDK keeps the job it created only here
    name = training_job.training_job_name
    artifact = f"{output_path}/{name}/output/model.tar.gz"
    if wait:
        training_job.refresh()
        artifact = training_job.model_artifacts.s3_model_artifacts
    return name, artifact


if __name__ == "__main__":
    fire.Fire(launch)
