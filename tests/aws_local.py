"""Offline AWS for the SageMaker tests: a moto server on loopback, and a training container's /opt/ml
simulated from what a launched job uploaded.

Here and nowhere else: moto's replies carry empty ``VpcConfig`` / ``DataCaptureConfig`` dicts that the
SDK's v3 resource classes refuse, so ``strip_moto_empty_fields`` drops them on every SageMaker client.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from packaging.utils import canonicalize_name

from handler.control import is_model_server
from tests.bundle_runs import REPO
from tests.environments import requirements_of

REGION, ACCOUNT = "eu-west-1", "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/skin-lesion-sagemaker"
BUCKET = "skin-lesion-test"


def require(module: str):
    """Import ``module``; skip without it locally, but fail under CI=true (CI must run these tests)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is not installed ({error}): CI installs requirements-sagemaker.txt")
        pytest.skip(f"{module} is not installed: pip install -r requirements-sagemaker.txt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_aws(tmp_path: Path):
    """A moto server on 127.0.0.1 with one bucket; yields the environment that points AWS clients at it."""
    require("moto.server")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import requests

    # moto keeps its state per process, not per server: start each module's AWS empty
    requests.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=30).raise_for_status()
    config = tmp_path / "sagemaker-config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "SAGEMAKER_VALIDATE_ROLE": "false",  # moto lacks iam:SimulatePrincipalPolicy
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@contextlib.contextmanager
def strip_moto_empty_fields():
    """Drop the empty VpcConfig / DataCaptureConfig dicts from moto's SageMaker replies, in this process."""

    def strip(parsed, **_):
        for key in ("VpcConfig", "DataCaptureConfig"):
            if parsed.get(key) == {}:
                del parsed[key]

    with _on_every_sagemaker_client("after-call.sagemaker", strip):
        yield


@contextlib.contextmanager
def record_training_job_requests(path: Path):
    """Append each CreateTrainingJob request this process sends (its parameters, as botocore is handed
    them) to ``path`` as a JSON line. moto replaces a job's MetricDefinitions with canned ones and drops
    its RetryStrategy, so a test reads what the launcher asked AWS for here."""

    def record(params, **_):
        with open(path, "a") as file:
            file.write(json.dumps(params, default=str) + "\n")

    with _on_every_sagemaker_client("before-parameter-build.sagemaker.CreateTrainingJob", record):
        yield


def recorded_training_job_request(path: Path, job_name: str) -> dict:
    """The CreateTrainingJob request of ``job_name`` that ``record_training_job_requests`` wrote to ``path``."""
    requests = [json.loads(line) for line in Path(path).read_text().splitlines()]
    (request,) = [request for request in requests if request["TrainingJobName"] == job_name]
    return request


@contextlib.contextmanager
def no_endpoint_quota():
    """CreateEndpoint refused in this process as AWS refuses it in an account whose quota for the instance type
    is 0, a new account's usual first failure (moto creates any endpoint)."""
    from botocore.awsrequest import AWSResponse

    def refuse(**_):
        error = {
            "Code": "ResourceLimitExceeded",
            "Message": "The account-level service limit 'ml.c5.xlarge for endpoint usage' is 0 Instances",
        }
        return AWSResponse("", 400, {}, None), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}

    with _on_every_sagemaker_client("before-call.sagemaker.CreateEndpoint", refuse):
        yield


def recording_hooks(folder: Path, record_to: Path | None = None, no_quota: bool = False) -> dict:
    """The environment that installs, in a CLI's own process, the moto fix-ups above (a test-only
    ``sitecustomize.py`` in ``folder``), with ``record_to`` the request recorder, with ``no_quota``
    ``no_endpoint_quota``."""
    lines = [
        "import sys",
        f"sys.path.insert(0, {str(REPO)!r})",
        "from tests.aws_local import no_endpoint_quota, record_training_job_requests, strip_moto_empty_fields",
        "HOOKS = [strip_moto_empty_fields()]  # kept: a collected generator would undo the patch",
    ]
    if record_to is not None:
        lines.append(f"HOOKS.append(record_training_job_requests({str(record_to)!r}))")
    if no_quota:
        lines.append("HOOKS.append(no_endpoint_quota())")
    lines.append("for hook in HOOKS:\n    hook.__enter__()")
    (folder / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    return {"PYTHONPATH": str(folder)}


@contextlib.contextmanager
def _on_every_sagemaker_client(event: str, handler):
    """Register ``handler`` for ``event`` on every SageMaker client created in this process meanwhile."""
    import botocore.session

    original = botocore.session.Session.create_client

    def create_client(self, service_name, *args, **kwargs):
        client = original(self, service_name, *args, **kwargs)
        if service_name == "sagemaker":
            client.meta.events.register(event, handler)
        return client

    botocore.session.Session.create_client = create_client
    try:
        yield
    finally:
        botocore.session.Session.create_client = original


def upload_folder(folder: Path, bucket: str, prefix: str) -> str:
    import boto3

    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def download_prefix(uri: str, folder: Path) -> None:
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :].lstrip("/")
            if relative and "__pycache__" not in relative:
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(folder / relative))


def simulated_container(job: dict, root: Path, host: str, master_port: int) -> Path:
    """The /opt/ml of ``host`` for the training job ``job`` (describe_training_job's reply), under ``root``.

    Every input channel (training data, the uploaded source code, the SDK's drivers with its
    sm_train.sh) is downloaded from S3 as SageMaker does, and the config JSONs are written as it writes
    them. The SDK's scripts hard-code /opt/ml, so their copies have it replaced by ``root``/opt/ml;
    and the master host, algo-1 in a real cluster, is this machine's loopback at ``master_port``.
    """
    opt_ml = root / "opt" / "ml"
    hosts = [f"algo-{index + 1}" for index in range(job["ResourceConfig"]["InstanceCount"])]
    channels = {}
    for channel in job["InputDataConfig"]:
        folder = opt_ml / "input" / "data" / channel["ChannelName"]
        download_prefix(channel["DataSource"]["S3DataSource"]["S3Uri"], folder)
        channels[channel["ChannelName"]] = {
            "TrainingInputMode": channel.get("InputMode", job["AlgorithmSpecification"]["TrainingInputMode"]),
            "S3DistributionType": "FullyReplicated",
            "RecordWrapperType": "None",
        }
    if job.get("CheckpointConfig"):  # a (re)started job finds what earlier runs synced to S3
        local = local_path(opt_ml, job["CheckpointConfig"].get("LocalPath", "/opt/ml/checkpoints"))
        local.mkdir(parents=True)
        download_prefix(job["CheckpointConfig"]["S3Uri"], local)
    config = opt_ml / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(
        json.dumps(
            {
                "current_host": host,
                "current_instance_type": job["ResourceConfig"]["InstanceType"],
                "hosts": hosts,
                "network_interface_name": "lo",
                "current_group_name": "homogeneousCluster",
            }
        )
    )
    (config / "inputdataconfig.json").write_text(json.dumps(channels))
    # hyperparameters naming the container's folders (checkpoint_dir, tensorboard_dir) point into ``root``
    hyperparameters = {
        key: value.replace("/opt/ml", str(opt_ml)) for key, value in job.get("HyperParameters", {}).items()
    }
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    for folder in ("model", "output/data"):
        (opt_ml / folder).mkdir(parents=True)
    for script in (opt_ml / "input" / "data" / "sm_drivers").rglob("*"):
        if script.suffix in (".sh", ".py"):
            text = script.read_text().replace("/opt/ml", str(opt_ml))
            text = text.replace('SM_MASTER_ADDR = "algo-1"', 'SM_MASTER_ADDR = "127.0.0.1"')
            script.write_text(text.replace("SM_MASTER_PORT = 7777", f"SM_MASTER_PORT = {master_port}"))
    return opt_ml


def local_path(opt_ml: Path, container_path: str) -> Path:
    """Where the container's ``/opt/ml/...`` folder lies in the simulated ``opt_ml``."""
    return opt_ml / Path(container_path).relative_to("/opt/ml")


def sync_checkpoints(job: dict, opt_ml: Path) -> None:
    """Upload the container's checkpoint folder to the job's checkpoint URI, as SageMaker does while the
    job runs and when spot capacity is reclaimed."""
    config = job["CheckpointConfig"]
    bucket, _, prefix = config["S3Uri"].removeprefix("s3://").partition("/")
    upload_folder(local_path(opt_ml, config.get("LocalPath", "/opt/ml/checkpoints")), bucket, prefix.rstrip("/"))


def start_container(opt_ml: Path, job_name: str, log: Path) -> subprocess.Popen:
    """Run the job's sm_train.sh as the container would (``/bin/bash -c``), with this venv's python first on PATH.

    It leads a process group of its own: a test stops the whole container (driver, torchrun, bundle) at
    once, as a reclaimed spot instance is stopped."""
    env = dict(
        os.environ,
        TRAINING_JOB_NAME=job_name,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen(
        ["/bin/bash", str(opt_ml / "input" / "data" / "sm_drivers" / "sm_train.sh")],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextlib.contextmanager
def inference_toolkit(model_dir: Path, scratch: Path):
    """AWS's PyTorch inference toolkit (the PyTorch inference container's server: TorchServe with its own
    handler calling code/inference.py) serving ``model_dir`` on loopback, without Docker; yields its URL.

    It writes /etc/sagemaker-ts.properties. The toolkit gives up 10 s after its start when it finds another
    TorchServe running, so this refuses to start it then.
    """
    import shutil
    import signal
    import time

    import requests

    require("sagemaker_pytorch_serving_container")
    leftovers = [process.pid for process in psutil.process_iter() if is_model_server(process)]
    assert not leftovers, f"TorchServe already runs here (pids {leftovers}): an earlier test left it running"
    wheels = inference_wheels()
    base, cwd, site = scratch / "base", scratch / "cwd", scratch / "site"
    shutil.copytree(model_dir, base / "model")  # the container extracts model.tar.gz to <base>/model
    cwd.mkdir()
    port, metrics, grpc_inference, grpc_management = (free_port() for _ in range(4))
    env = dict(
        os.environ,
        SAGEMAKER_BASE_DIR=str(base),
        SAGEMAKER_BIND_TO_PORT=str(port),
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{metrics}",
        TS_GRPC_INFERENCE_PORT=str(grpc_inference),
        TS_GRPC_MANAGEMENT_PORT=str(grpc_management),
        LOG_LOCATION=str(scratch / "logs"),
        # it pip-installs code/requirements.txt at start, as the container does: from the wheels make downloaded,
        # into a folder its workers import first (the container's torch and numpy are this venv's)
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(wheels),
        PIP_TARGET=str(site),
        PIP_NO_DEPS="1",
        PYTHONPATH=str(site),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    log = scratch / "toolkit.log"
    server = subprocess.Popen(
        [sys.executable, "-c", "from sagemaker_pytorch_serving_container import serving; serving.main()"],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def logs() -> str:
        return "\n".join(
            f"--- {path.name}:\n" + path.read_text(errors="replace")[-3000:]
            for path in (log, scratch / "logs" / "ts_log.log", scratch / "logs" / "model_log.log")
            if path.exists()
        )

    try:
        # /ping answers once the frontend listens, before the workers have loaded; wait for a ready
        # worker (management API, on the same port) so that a test's first request does not race the load
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, logs()
            assert time.monotonic() < deadline, f"no ready worker after 240 s:\n{logs()}"
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    (model,) = requests.get(f"{url}/models/model", timeout=5).json()
                    if any(worker["status"] == "READY" for worker in model["workers"]):
                        break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert installed_distributions(site) >= pinned_requirements(), "code/requirements.txt was not installed"
        try:
            yield url
        except requests.RequestException as error:  # the server's side of a failed request
            raise AssertionError(f"{error!r}\n{logs()}") from error
    finally:
        server.send_signal(signal.SIGTERM)  # it passes SIGTERM on to TorchServe
        server.wait(timeout=120)


def pinned_requirements() -> set[tuple[str, str]]:
    """(name, version) of each ``name==version`` line of cloud/inference_requirements.txt."""
    pinned = set()
    for requirement in requirements_of((REPO / "cloud" / "inference_requirements.txt").open()):
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"cloud/inference_requirements.txt: pin {requirement} exactly"
        pinned.add((canonicalize_name(requirement.name), specifier.version))
    return pinned


def installed_distributions(site: Path) -> set[tuple[str, str]]:
    """(name, version) of every distribution pip installed into ``site``."""
    return {
        (canonicalize_name(dist.metadata["Name"]), dist.version)
        for dist in importlib.metadata.distributions(path=[str(site)])
    }


def inference_wheels() -> Path:
    """The wheels of cloud/inference_requirements.txt (the archive's code/requirements.txt), which `make
    venv-sagemaker` downloads: skip without them locally, fail under CI=true."""
    wheels = REPO / ".venv" / "inference-wheels"
    if not any(wheels.glob("*.whl")):
        message = f"no wheels in {wheels}: make venv-sagemaker downloads cloud/inference_requirements.txt's"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return wheels


class SageMakerRuntimeFront:
    """sagemaker-runtime's InvokeEndpoint on loopback, in front of real model servers: what AWS's
    runtime front does between a client and an endpoint's container, for clients pointed at it through
    ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` (moto's runtime only replays canned answers).

    ``endpoints`` maps an endpoint name to its container's URL (SageMaker's ``/invocations`` route). As
    AWS does, it passes the body, content type and accept header on; returns a 2xx answer as it is;
    wraps a non-2xx answer in a 424 ModelError carrying the container's status and body
    (``OriginalStatusCode``, ``OriginalMessage``); answers an unknown endpoint with ValidationError and
    an unreachable container with ServiceUnavailable. ``throttle(n)`` answers the next n calls with
    ThrottlingException, as an account over its invocation quota is; ``delay(s)`` holds each call s seconds
    first, as a slow model does. ``calls`` lists the endpoint of every call received.
    """

    def __init__(self, endpoints: dict[str, str]) -> None:
        self.endpoints = dict(endpoints)
        self.calls: list[str] = []
        self._throttled = 0
        self._delay_s = 0.0
        self._server = None

    def throttle(self, count: int) -> None:
        self._throttled = count

    def delay(self, seconds: float) -> None:
        self._delay_s = seconds

    def __enter__(self) -> str:
        import http.server
        import threading
        import time

        import requests

        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                match = re.fullmatch(r"/endpoints/([^/]+)/invocations", self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not match:
                    return self.reply(404, {"message": f"unknown route {self.path}"}, "UnknownOperationException")
                front.calls.append(name := match[1])
                time.sleep(front._delay_s)
                if front._throttled > 0:
                    front._throttled -= 1
                    return self.reply(400, {"message": "Rate exceeded"}, "ThrottlingException")
                if name not in front.endpoints:
                    message = f"Endpoint {name} of account {ACCOUNT} not found."
                    return self.reply(400, {"message": message}, "ValidationError")
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                try:
                    answer = requests.post(
                        f"{front.endpoints[name]}/invocations", data=body, headers=headers, timeout=60
                    )
                except requests.ConnectionError:
                    return self.reply(503, {"message": f"endpoint {name} is not reachable"}, "ServiceUnavailable")
                if answer.ok:
                    self.send_response(200)
                    self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                    self.send_header("x-Amzn-Invoked-Production-Variant", "AllTraffic")
                    self.send_header("Content-Length", str(len(answer.content)))
                    self.end_headers()
                    self.wfile.write(answer.content)
                    return None
                kind = "CLIENT" if answer.status_code < 500 else "SERVER"
                error = {
                    "ErrorCode": f"{kind}_ERROR_FROM_MODEL",
                    "LogStreamArn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/{name}",
                    "Message": f"Received {kind.lower()} error ({answer.status_code}) from primary with message "
                    f'"{answer.text}".',
                    "OriginalMessage": answer.text,
                    "OriginalStatusCode": answer.status_code,
                }
                return self.reply(424, error, "ModelError")

            def reply(self, status: int, body: dict, error_type: str) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("x-amzn-ErrorType", error_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet: the tests read ``calls``
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
