"""Launch the bundle as a SageMaker training job (SDK v3 ``ModelTrainer``).

    python scripts/sagemaker_train.py --data s3://BUCKET/ham10000/ [--role ARN --region R --bucket B]
        [--instance_type ml.g5.xlarge --instance_count 1 --gpus_per_instance N --torchrun true]
        [--image URI] [--max_runtime_s 86400 --volume_gb 50 --prefix skin-lesion] [--wait]
        [--spot true --max_wait_s 172800] [--retry_attempts 2] [--checkpoint_s3 s3://BUCKET/checkpoints/run1]
        [--tensorboard true] [--input_mode File|FastFile]
        [--epochs 30 --image_size "[224,224]" --batch_size 256 --learning_rate 0.001 --imbalance loss ...]

``--data`` is the HAM10000 folder in S3 (metadata CSV plus images, either layout), the job's 'training'
channel. Every other ``--key value`` is a hyperparameter for ``scripts/sagemaker_entry.py`` (checked
here, before anything is uploaded). The bundle (configs/, bundle/, cloud/, the entry script and the
container's requirements) goes up as the job's source code. With ``--torchrun`` (the default) the
SDK's torchrun driver starts one process per GPU (``--gpus_per_instance`` to choose) on every
instance; ``--torchrun false`` runs one plain process. The image defaults to AWS's PyTorch training
container for the instance type. Prints the job name and the model artifact's S3 URI, which
``scripts/sagemaker_deploy.py deploy`` takes as it is.

Production settings (docs/SAGEMAKER.md, *Production*): ``--spot true`` trains on managed spot capacity,
waiting up to ``--max_wait_s`` (default: ``--max_runtime_s``) for it; ``--retry_attempts N`` (0, the
default: off) retries a job that failed on a transient error (e.g. no capacity). Either gives the job a
checkpoint configuration: the container's ``/opt/ml/checkpoints``, synced with ``--checkpoint_s3``
(default: beside the job's artifacts), is the bundle's checkpoint folder, so a restarted job resumes. The
job always reports its metrics (``cloud.job_metrics``) to SageMaker; ``--tensorboard`` (on by default)
uploads the bundle's TensorBoard files. ``--input_mode FastFile`` streams the data channel from S3
instead of copying it first (``File``, the default: see the measurements in docs/SAGEMAKER.md).
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
# Installed by the SDK's driver in the training container, whose image brings torch (psutil: the image cache sizes
# itself to the free memory on a CPU).
CONTAINER_REQUIREMENTS = "monai[fire,pillow,ignite,tqdm,tensorboard]==1.6.1\nmatplotlib\npsutil\n"
CHANNEL = "training"
# SageMaker's own defaults for the container's folders that it syncs with S3 while the job runs.
CHECKPOINT_PATH = "/opt/ml/checkpoints"
TENSORBOARD_PATH = "/opt/ml/output/tensorboard"
INPUT_MODES = ("File", "FastFile")
MAX_RETRY_ATTEMPTS = 30  # the API's limit (RetryStrategy.MaximumRetryAttempts)
# The job settings the launcher sets from its own options, never typed as hyperparameters.
SET_BY_THE_LAUNCHER = {"checkpoint_dir": "--spot true or --retry_attempts", "tensorboard_dir": "--tensorboard"}


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
    spot: bool = False,
    max_wait_s: int = None,
    retry_attempts: int = 0,
    checkpoint_s3: str = None,
    tensorboard: bool = True,
    input_mode: str = "File",
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
        job |= _production(job, spot, max_wait_s, retry_attempts, checkpoint_s3, tensorboard, input_mode, prefix)
        wait = aws.boolean(wait, "--wait")
    except (aws.SetupError, HyperparameterError) as error:
        sys.exit(f"error: {error}")
    started = start(job, image, volume_gb, prefix, wait)
    print(f"training job: {started['name']}")
    print(f"model artifact: {started['artifact']}")
    for what in ("checkpoints", "tensorboard"):
        if started.get(what):
            print(f"{what}: {started[what]}")


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


def _production(job, spot, max_wait_s, retry_attempts, checkpoint_s3, tensorboard, input_mode, prefix) -> dict:
    """The spot, retry, checkpoint, TensorBoard and input-mode options, checked; the hyperparameters the
    entry script then needs (its checkpoint and TensorBoard folders) added to the job's."""
    spot = aws.boolean(spot, "--spot")
    tensorboard = aws.boolean(tensorboard, "--tensorboard")
    for key, option in SET_BY_THE_LAUNCHER.items():
        if key in job["hyperparameters"]:
            raise aws.SetupError(f"--{key} is set by the launcher ({option}), not passed as a hyperparameter")
    if (
        isinstance(retry_attempts, bool)
        or not isinstance(retry_attempts, int)
        or not 0 <= retry_attempts <= MAX_RETRY_ATTEMPTS
    ):
        raise aws.SetupError(
            f"--retry_attempts must be a whole number from 0 (off) to {MAX_RETRY_ATTEMPTS}, not {retry_attempts!r}"
        )
    if max_wait_s is not None:
        if not spot:
            raise aws.SetupError("--max_wait_s is the wait for spot capacity: it needs --spot true")
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, int) or max_wait_s < job["max_runtime_s"]:
            raise aws.SetupError(
                f"--max_wait_s must be a whole number of seconds, at least --max_runtime_s ({job['max_runtime_s']}): "
                f"it counts the training time plus the wait for spot capacity, not {max_wait_s!r}"
            )
    checkpoints = spot or retry_attempts > 0
    if checkpoint_s3 is not None:
        if not checkpoints:
            raise aws.SetupError("--checkpoint_s3 needs checkpoints: pass --spot true or --retry_attempts N")
        aws.s3_uri(checkpoint_s3, "--checkpoint_s3")
    if input_mode not in INPUT_MODES:
        raise aws.SetupError(
            f"--input_mode must be one of {', '.join(INPUT_MODES)}, not {input_mode!r} "
            "(Pipe streams record files; the bundle reads image files: FastFile streams those)"
        )
    hyperparameters = dict(job["hyperparameters"])
    if checkpoints:
        hyperparameters["checkpoint_dir"] = CHECKPOINT_PATH
    if tensorboard:
        hyperparameters["tensorboard_dir"] = TENSORBOARD_PATH
    return {
        "spot": spot,
        "max_wait_s": (max_wait_s or job["max_runtime_s"]) if spot else None,
        "retry_attempts": retry_attempts,
        "checkpoints": checkpoints,
        "checkpoint_s3": checkpoint_s3,
        "tensorboard_s3": f"s3://{job['bucket']}/{prefix}/tensorboard" if tensorboard else None,
        "input_mode": input_mode,
        "hyperparameters": hyperparameters,
    }


def start(job: dict, image: str | None, volume_gb: int, prefix: str, wait: bool) -> dict:
    """Upload the source and create the job; return its name, its model artifact's S3 URI and, when
    the job has them, its checkpoint and TensorBoard S3 URIs."""
    session = aws.session(job["region"], job["bucket"])
    from sagemaker.core.shapes import Channel, DataSource, S3DataSource
    from sagemaker.core.training.configs import (
        CheckpointConfig,
        Compute,
        OutputDataConfig,
        RetryStrategy,
        SourceCode,
        StoppingCondition,
        TensorBoardOutputConfig,
    )
    from sagemaker.train import ModelTrainer
    from sagemaker.train.distributed import Torchrun

    from cloud.job_metrics import metric_definitions

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
                instance_type=job["instance_type"],
                instance_count=job["instance_count"],
                volume_size_in_gb=volume_gb,
                enable_managed_spot_training=job["spot"] or None,
            ),
            stopping_condition=StoppingCondition(
                max_runtime_in_seconds=job["max_runtime_s"], max_wait_time_in_seconds=job["max_wait_s"]
            ),
            output_data_config=OutputDataConfig(s3_output_path=output_path),
            hyperparameters=job["hyperparameters"],
            training_input_mode=job["input_mode"],
        ).with_metric_definitions(metric_definitions())
        if job["checkpoints"]:
            # without an S3 URI the SDK picks s3://<bucket>/<prefix>/<job name>/checkpoints
            trainer.with_checkpoint_config(CheckpointConfig(s3_uri=job["checkpoint_s3"], local_path=CHECKPOINT_PATH))
        if job["tensorboard_s3"]:
            trainer.with_tensorboard_output_config(
                TensorBoardOutputConfig(s3_output_path=job["tensorboard_s3"], local_path=TENSORBOARD_PATH)
            )
        if job["retry_attempts"]:
            trainer.with_retry_strategy(RetryStrategy(maximum_retry_attempts=job["retry_attempts"]))
        # The SDK gives every channel it builds InputMode File, which outranks the job's training_input_mode:
        # the data channel is built here with the chosen mode (the code and driver channels stay File).
        data_channel = Channel(
            channel_name=CHANNEL,
            data_source=DataSource(
                s3_data_source=S3DataSource(
                    s3_data_type="S3Prefix", s3_uri=job["data"], s3_data_distribution_type="FullyReplicated"
                )
            ),
            input_mode=job["input_mode"],
        )
        trainer.train(input_data_config=[data_channel], wait=wait, logs=wait)
    training_job = trainer._latest_training_job  # the SDK keeps the job it created only here
    name = training_job.training_job_name
    started = {
        "name": name,
        "artifact": f"{output_path}/{name}/output/model.tar.gz",
        "checkpoints": trainer.checkpoint_config.s3_uri if trainer.checkpoint_config else None,
        "tensorboard": job["tensorboard_s3"],
    }
    if wait:
        training_job.refresh()
        started["artifact"] = training_job.model_artifacts.s3_model_artifacts
    return started


if __name__ == "__main__":
    fire.Fire(launch)
