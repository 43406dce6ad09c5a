"""The Open Inference Protocol (KServe v2) on the real TorchServe, started as the InferenceService starts it: the
command of deploy/kubernetes/kserve/inferenceservice.yaml over the image's files and the model storage
scripts/kserve_store.py lays out (config/config.properties with service_envelope=kservev2,
model-store/skin_lesion.mar), with TS_SERVICE_ENVELOPE=kservev2 as KServe's runtime sets it and the ports moved to
free loopback ones. The consumer is
KServe's own REST client (the ``kserve`` package, in .venv-kserve: tests/kserve_sdk.py).

Skipped without Java, TorchServe or .venv-kserve (``make venv-kserve``), except under CI=true, where that is a
failure.
"""

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from bundle.labels import CLASS_NAMES
from bundle.predictor import Predictor
from handler import MODEL_NAME, control
from tests.bundle_runs import REPO
from tests.serving import (
    FLAGGED_FIELDS,
    SERVED_FIELDS,
    bundle_with_random_weights,
    out_of_distribution_image,
    store_guard,
    store_triage_calibration,
)
from tests.test_byoc import pod_command
from tests.test_torchserve import _free_ports, _package, _require_torchserve

INFERENCE_SERVICE = REPO / "deploy" / "kubernetes" / "kserve" / "inferenceservice.yaml"
KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"
KSERVE_MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri's files
TOLERANCE = 1e-5
TRAINED_IMAGE_SIZE = [32, 32]


def require_kserve_sdk() -> Path:
    if not KSERVE_PYTHON.is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{KSERVE_PYTHON} is missing: CI must run the KServe tests (make venv-kserve)")
        pytest.skip(f"{KSERVE_PYTHON} is missing: make venv-kserve")
    return KSERVE_PYTHON


def kserve_sdk(*arguments) -> object:
    """tests/kserve_sdk.py in the KServe venv; its JSON output."""
    result = subprocess.run(
        [str(require_kserve_sdk()), str(REPO / "tests" / "kserve_sdk.py"), *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def write_store(mar: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/kserve_store.py", "--mar", str(mar), "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory, synthetic_dir) -> Path:
    _require_torchserve()
    require_kserve_sdk()
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle_root"), trained_image_size=TRAINED_IMAGE_SIZE)
    store_triage_calibration(root, [path.read_bytes() for path in _lesions(synthetic_dir)])
    store_guard(root, synthetic_dir)
    return root


def _lesions(synthetic_dir: Path) -> list[Path]:
    return sorted((synthetic_dir / "images").glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def store(bundle_root, tmp_path_factory) -> Path:
    """The KServe model storage of an archive packaged for KServe (one request per batch)."""
    mar = _package(bundle_root, tmp_path_factory.mktemp("dist"), batch_size=1, max_batch_delay_ms=1)
    output = tmp_path_factory.mktemp("kserve")
    result = write_store(mar, output)
    assert result.returncode == 0, result.stdout + result.stderr
    return output


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """The InferenceService's command and environment over the image's files, /mnt/models being ``store``, the
    ports moved to free loopback ones and TS_SERVICE_ENVELOPE=kservev2 as KServe's runtime sets it; ready once
    the readiness probe's file is there."""
    predictor = yaml.safe_load(INFERENCE_SERVICE.read_text())["spec"]["predictor"]["model"]
    work = tmp_path_factory.mktemp("kserve_pod")
    run_dir = work / "serve"
    # the image's baked-in archive is not what KServe serves: the store's is
    command, env, here = pod_command(
        predictor, work, store / "model-store" / f"{MODEL_NAME}.mar", {KSERVE_MOUNT: store, "/tmp/serve": run_dir}
    )
    inference, grpc_inference, grpc_management = _free_ports(3)
    command += ["--inference_port", inference, "--grpc_inference_port", grpc_inference]
    command += ["--grpc_management_port", grpc_management]
    env |= {"TS_SERVICE_ENVELOPE": "kservev2"}  # what KServe's runtime sets for protocolVersion v2
    ready = Path(here(predictor["readinessProbe"]["exec"]["command"][1]))
    with open(work / "serve.out", "wb") as out:
        process = subprocess.Popen(
            [str(argument) for argument in command], cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 240
        while not ready.is_file():
            assert process.poll() is None, (work / "serve.out").read_text()[-3000:]
            assert time.monotonic() < deadline, control._log_tail(run_dir)
            time.sleep(1)
        assert _worker_ready(run_dir / control.MANAGEMENT_SOCKET), "ready means a worker has loaded the model"
        yield {
            "url": f"http://127.0.0.1:{inference}",
            "socket": run_dir / control.MANAGEMENT_SOCKET,
            "run_dir": run_dir,
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        finally:
            control.stop_server(run_dir)  # and its workers, if the signal left any


def _worker_ready(socket: Path) -> bool:
    try:
        workers = control._unix_socket_request(str(socket), "GET", f"/models/{MODEL_NAME}", 5).json()[0]["workers"]
    except (requests.ConnectionError, ValueError, KeyError, IndexError):
        return False
    return any(worker["status"] == "READY" for worker in workers)


@pytest.fixture(scope="module")
def images(synthetic_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    (folder / "frame.jpg").write_bytes(out_of_distribution_image())
    (folder / "not_an_image.jpg").write_bytes(b"these bytes are no JPEG")
    lesions = _lesions(synthetic_dir)[:2]
    return {
        "lesion-0": lesions[0],
        "lesion-1": lesions[1],
        "frame": folder / "frame.jpg",
        "bad": folder / "not_an_image.jpg",
    }


def test_the_config_is_handler_config_with_what_kserve_needs(store):
    written = _properties((store / "config" / "config.properties").read_text())
    local = _properties((REPO / "handler" / "config.properties").read_text())
    kserve = {
        "inference_address": "http://0.0.0.0:8080",
        "service_envelope": "kservev2",
        "disable_token_authorization": "true",
        "model_store": f"{KSERVE_MOUNT}/model-store",
        "load_models": "skin_lesion.mar",
    }
    assert {key: written[key] for key in kserve} == kserve
    assert written["management_address"].startswith("unix:"), "no key guards management: not a port"
    # everything else as handler/config.properties says, nothing added
    overridden = {*kserve, "management_address"}
    assert {key: value for key, value in written.items() if key not in overridden} == {
        key: value for key, value in local.items() if key not in overridden
    }
    assert sorted(path.name for path in (store / "model-store").iterdir()) == ["skin_lesion.mar"]


def _properties(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_an_archive_that_batches_requests_is_refused(bundle_root, tmp_path):
    """The kservev2 envelope answers only the first request of a batch, and TorchServe takes the batch size from
    the archive, not from config.properties: the layout refuses such an archive, saying how to package one."""
    mar = _package(bundle_root, tmp_path / "dist", batch_size=4)
    result = write_store(mar, tmp_path / "kserve")
    assert result.returncode != 0
    assert "--batch_size 1" in result.stderr and str(mar) in result.stderr
    assert not (tmp_path / "kserve" / "config").exists()


def test_v2_answers_each_image_with_the_calibrated_probabilities_and_class_names(server, bundle_root, images):
    """One v2 request from KServe's client: two lesions, a green frame the guard flags, and bytes that are no
    image. Each input gets an output of its name holding the answer the plain route gives: the lesions the
    Predictor's calibrated probabilities by class name, the frame no diagnosis, the bad bytes their own error."""
    response = kserve_sdk("infer", server["url"], MODEL_NAME, *images.values())
    assert response["model_name"] == MODEL_NAME and response["id"] == "skin-lesion-test"
    outputs = {output["name"]: output for output in response["outputs"]}
    assert list(outputs) == [f"image-{index}" for index in range(len(images))]
    assert all(output["datatype"] == "BYTES" and output["shape"] == [1] for output in outputs.values())
    answers = dict(zip(images, (json.loads(output["data"][0]) for output in outputs.values()), strict=True))

    expected = Predictor(bundle_root, device="cpu").predict(
        [images["lesion-0"].read_bytes(), images["lesion-1"].read_bytes()]
    )
    for name, prediction in zip(["lesion-0", "lesion-1"], expected, strict=True):
        answer, wanted = answers[name], prediction.to_json()
        assert set(answer) == SERVED_FIELDS
        assert list(answer["probabilities"]) == list(CLASS_NAMES)
        np.testing.assert_allclose(
            list(answer["probabilities"].values()), list(wanted["probabilities"].values()), rtol=0, atol=TOLERANCE
        )
        # the sidecar's calibration reached the worker: its decision rule and refer threshold
        for field in ("class", "label", "decision_rule", "most_probable_class", "refer", "refer_threshold"):
            assert answer[field] == wanted[field], field
        assert answer["decision_rule"] == "balanced" and answer["refer_threshold"] is not None

    frame = answers["frame"]
    assert set(frame) == FLAGGED_FIELDS and frame["class"] is None and frame["out_of_distribution"] is True
    assert frame["reason"] and frame["ood_score"] > frame["ood_threshold"]
    assert answers["bad"]["status"] == 400 and answers["bad"]["error"]


def test_inputs_that_carry_no_image_get_their_own_error(server, images):
    """Raw HTTP, as any v2 client sends it: a good image among a tensor input and bad base64."""
    body = {
        "id": "mixed",
        "inputs": [
            {
                "name": "lesion",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(images["lesion-0"].read_bytes()).decode()],
            },
            {"name": "tensor", "shape": [3], "datatype": "FP32", "data": [0.1, 0.2, 0.3]},
            {"name": "not-base64", "shape": [1], "datatype": "BYTES", "data": ["%%% not base64 %%%"]},
        ],
    }
    response = requests.post(f"{server['url']}/v2/models/{MODEL_NAME}/infer", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answers = {output["name"]: json.loads(output["data"][0]) for output in response.json()["outputs"]}
    assert answers["lesion"]["class"] in CLASS_NAMES
    assert answers["tensor"]["status"] == 400 and "BYTES" in answers["tensor"]["error"]
    assert answers["not-base64"]["status"] == 400 and "base64" in answers["not-base64"]["error"]


def test_the_server_runs_as_kserve_expects(server):
    """One request per batch (the archive's batch size), /ping without a key (token authorisation is off in the
    pod), and no management port: only the socket."""
    described = control._unix_socket_request(str(server["socket"]), "GET", f"/models/{MODEL_NAME}", 5).json()[0]
    assert described["batchSize"] == 1
    assert requests.get(f"{server['url']}/ping", timeout=30).json() == {"status": "Healthy"}


def test_concurrent_v2_requests_each_get_their_own_answer(server, images):
    """The reason for batch size 1: the kservev2 envelope reads only a batch's first request. Requests sent at
    once are each answered, with their own id and their own inputs' names."""
    lesion = base64.b64encode(images["lesion-0"].read_bytes()).decode()

    def send(index: int) -> requests.Response:
        body = {
            "id": f"request-{index}",
            "inputs": [
                {"name": f"r{index}-image-{j}", "shape": [1], "datatype": "BYTES", "data": [lesion]}
                for j in range(index % 3 + 1)
            ],
        }
        return requests.post(f"{server['url']}/v2/models/{MODEL_NAME}/infer", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(send, range(6)))
    for index, response in enumerate(responses):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"] == f"request-{index}"
        assert [output["name"] for output in answer["outputs"]] == [f"r{index}-image-{j}" for j in range(index % 3 + 1)]
        assert all(json.loads(output["data"][0])["class"] in CLASS_NAMES for output in answer["outputs"])
