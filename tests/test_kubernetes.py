"""deploy/kubernetes/ checked offline, as far as no cluster allows: every core resource of the base and of the GPU
overlay (kustomize's JSON patch applied with jsonpatch) against the Kubernetes 1.37 schemas
(kubernetes-validate, strict: unknown fields are errors), the InferenceService against the KServe SDK's
V1beta1InferenceService (tests/kserve_sdk.py, in .venv-kserve), the references between the resources, and the
Deployment's container command run against the files docker/Dockerfile copies (as tests/test_byoc.py lays them
out): a real TorchServe answering the probes and a prediction without a key, and stopping on SIGTERM.

The TorchServe test is skipped without Java or TorchServe, and the SDK check without .venv-kserve, except under
CI=true, where that is a failure.
"""

import concurrent.futures
import copy
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonpatch
import kubernetes_validate
import psutil
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from handler import MODEL_NAME, control
from tests.bundle_runs import REPO
from tests.serving import JPEG, SERVED_FIELDS, bundle_with_random_weights
from tests.test_byoc import pod_command
from tests.test_kserve_v2 import KSERVE_MOUNT, kserve_sdk
from tests.test_serve_security import _listening
from tests.test_torchserve import _free_ports, _package, _require_torchserve

KUBERNETES = REPO / "deploy" / "kubernetes"
BASE, GPU = KUBERNETES / "base", KUBERNETES / "overlays" / "gpu"
INFERENCE_SERVICE = KUBERNETES / "kserve" / "inferenceservice.yaml"
KUBERNETES_VERSION = "1.37.0"
# what the kustomizations below may use: _render applies exactly these
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "labels", "resources", "images", "patches"}


def _kustomization(folder: Path) -> dict:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZE_FIELDS, f"{folder}: fields the test's renderer does not apply"
    return kustomization


def _render(folder: Path) -> list[dict]:
    """The resources ``kubectl kustomize folder`` writes, for the kustomize fields these folders use."""
    kustomization = _kustomization(folder)
    resources = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        resources += _render(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for rule in kustomization.get("labels", []):
        assert rule.get("includeSelectors") is False and not rule.get("includeTemplates")
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(rule["pairs"])
    for image in kustomization.get("images", []):
        for container in _containers(resources):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image['name']}:{image['newTag']}"
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        matched = [
            i
            for i, resource in enumerate(resources)
            if (resource["kind"], resource["metadata"]["name"]) == (target["kind"], target["name"])
            and resource["apiVersion"] == f"{target['group']}/{target['version']}"
        ]
        assert len(matched) == 1, f"{folder / 'kustomization.yaml'}: the patch target matches {len(matched)} resources"
        resources[matched[0]] = jsonpatch.apply_patch(resources[matched[0]], operations)
    return resources


def _containers(resources: list[dict]) -> list[dict]:
    return [
        container
        for resource in resources
        if resource["kind"] == "Deployment"
        for container in resource["spec"]["template"]["spec"]["containers"]
    ]


def _by_kind(resources: list[dict]) -> dict[str, dict]:
    kinds = {resource["kind"]: resource for resource in resources}
    assert len(kinds) == len(resources), "one resource of each kind"
    return kinds


@pytest.mark.parametrize("folder", [BASE, GPU], ids=["base", "gpu"])
def test_every_resource_matches_the_kubernetes_schemas(folder):
    resources = _render(folder)
    assert {resource["kind"] for resource in resources} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Ingress",
    }
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_base_lists_every_manifest_beside_it():
    listed = set(_kustomization(BASE)["resources"])
    assert listed == {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_validator_refuses_a_wrong_field():
    """The schemas are strict: a misspelt field or a wrong type is an error, not ignored."""
    deployment = _by_kind(_render(BASE))["Deployment"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_resources_refer_to_each_other():
    """The Service, the NetworkPolicy and the HPA find the Deployment's pods; ports and probes use its named
    port; the Ingress reaches the Service."""
    kinds = _by_kind(_render(BASE))
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert kinds["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}, probe
    run_dir = container["command"][container["command"].index("--run_dir") + 1]
    assert container["readinessProbe"]["exec"]["command"] == ["cat", f"{run_dir}/{control.READY_FILE}"]
    backend = kinds["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    assert {rule["ports"][0]["port"] for rule in kinds["NetworkPolicy"]["spec"]["ingress"]} <= port_names


def test_the_ingress_admits_what_torchserve_admits():
    """The ingress's body limit is TorchServe's max_request_size (handler/config.properties), in MiB."""
    settings = dict(
        line.split("=", 1)
        for line in (REPO / "handler" / "config.properties").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    annotations = _by_kind(_render(BASE))["Ingress"]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{int(settings['max_request_size']) >> 20}m"
    assert annotations["nginx.ingress.kubernetes.io/auth-type"] == "basic"


def test_the_gpu_overlay_asks_for_one_gpu_and_the_gpu_image():
    (base,) = _containers(_render(BASE))
    (gpu,) = _containers(_render(GPU))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in base["resources"]["limits"]
    assert gpu["image"] == "skin-lesion-torchserve:gpu"
    assert {key: value for key, value in gpu.items() if key not in ("image", "resources")} == {
        key: value for key, value in base.items() if key not in ("image", "resources")
    }


def test_the_inference_service_matches_the_kserve_sdk_model(tmp_path):
    assert kserve_sdk("check_inference_service", INFERENCE_SERVICE) == []
    service = yaml.safe_load(INFERENCE_SERVICE.read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert (model["modelFormat"]["name"], model["protocolVersion"]) == ("pytorch", "v2")
    # serve.py serves what scripts/kserve_store.py lays out, and readiness is its ready file (tests/test_kserve_v2.py
    # runs this command)
    command = model["command"]
    assert command[command.index("--mar") + 1] == f"{KSERVE_MOUNT}/model-store/{MODEL_NAME}.mar"
    assert command[command.index("--ts_config") + 1] == f"{KSERVE_MOUNT}/config/config.properties"
    run_dir = command[command.index("--run_dir") + 1]
    assert model["readinessProbe"]["exec"]["command"] == ["cat", f"{run_dir}/{control.READY_FILE}"]
    assert model["livenessProbe"]["httpGet"]["path"] == "/ping"
    # the check finds what is wrong, by path
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["model"]["protocolVersions"] = "v2"
    broken["spec"]["predictor"]["minReplicas"] = "one"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    problems = kserve_sdk("check_inference_service", tmp_path / "broken.yaml")
    assert ".spec.predictor.model.protocolVersions: not a field of V1beta1ModelSpec" in problems
    assert any(problem.startswith(".spec.predictor.minReplicas: expected int") for problem in problems), problems


def test_authenticated_by_must_name_a_front(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/serve.py", "start", "--run_dir", str(tmp_path), "--authenticated_by", " "],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "--authenticated_by needs the name of the front" in result.stderr


@pytest.fixture
def mar(tmp_path_factory):
    _require_torchserve()
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=[32, 32])
    return _package(root, tmp_path_factory.mktemp("dist"))


def test_the_deployments_command_serves_without_a_key_and_stops_on_sigterm(mar, tmp_path, synthetic_dir):
    """The container's command and environment from deployment.yaml, run over the image's files: the probes'
    path answers without credentials, so does a prediction, the server says loudly which front must
    authenticate, listens on all interfaces for inference only, and SIGTERM (a pod's end) stops it all."""
    (container,) = _containers(_render(BASE))
    run_dir = tmp_path / "run"
    inference, metrics, grpc_inference, grpc_management = _free_ports(4)
    command, env, _ = pod_command(container, tmp_path, mar, {"/tmp/serve": run_dir})
    manifest_metrics = {port["name"]: port["containerPort"] for port in container["ports"]}["metrics"]
    assert command[command.index("--metrics_port") + 1] == str(manifest_metrics)
    command[command.index("--metrics_port") + 1] = metrics  # a free port on this machine
    command += ["--inference_port", inference, "--grpc_inference_port", grpc_inference]
    command += ["--grpc_management_port", grpc_management]
    front = container["command"][container["command"].index("--authenticated_by") + 1]
    process = subprocess.Popen(
        [str(argument) for argument in command],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{inference}"
        deadline = time.monotonic() + 240
        while not (run_dir / "server.json").is_file() or not _ping(url):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, control._log_tail(run_dir)
            time.sleep(1)
        server = control.read_server(run_dir)
        assert server["token_auth"] is False and server["authenticated_by"] == front
        image = sorted((synthetic_dir / "images").glob("*.jpg"))[0].read_bytes()
        deadline = time.monotonic() + 240
        while (response := _predict(url, image)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(1)  # /ping says Healthy while the worker still loads the model
        assert response.status_code == 200, response.text
        assert set(response.json()) == SERVED_FIELDS
        scraped = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=30)
        families = {family.name for family in text_string_to_metric_families(scraped.text)}
        assert {"ts_inference_requests", "skin_lesion_images_classified"} <= families, "what Prometheus scrapes"
        assert _listening(server["pid"]) == {
            ("0.0.0.0", inference),
            ("0.0.0.0", metrics),
            ("127.0.0.1", grpc_inference),
            ("127.0.0.1", grpc_management),
        }
        deadline = time.monotonic() + 30
        while not (run_dir / control.READY_FILE).is_file():
            assert time.monotonic() < deadline, "the readiness probe's file, once a worker has loaded the model"
            time.sleep(0.2)
        # the pod's end with requests in flight and queued: every one is answered before TorchServe stops
        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            answers = [pool.submit(_predict, url, image) for _ in range(48)]
            time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            statuses = [answer.result().status_code for answer in answers]
        assert statuses == [200] * 48
        grace = yaml.safe_load((BASE / "deployment.yaml").read_text())["spec"]["template"]["spec"]
        stdout, stderr = process.communicate(timeout=grace["terminationGracePeriodSeconds"])
        assert process.returncode == 0
        assert "WARNING: token authorisation is OFF" in stderr and front in stderr
        assert "ACCESS_LOG" in stdout and "MODEL_LOG" in stdout, "TorchServe's logs are the pod's log"
        assert not (run_dir / "server.json").exists(), "serve.py stopped TorchServe"
    finally:
        if process.poll() is None:
            process.kill()
        control.stop_server(run_dir)


def test_a_pod_stopped_while_the_model_loads_stops_its_server_too(mar, tmp_path):
    """SIGTERM before the model is ready (a rollout that changes its mind) still ends in a clean stop: no
    TorchServe is left behind the exited container process."""
    run_dir = tmp_path / "run"
    inference, management, grpc_inference, grpc_management = _free_ports(4)
    command = [sys.executable, REPO / "scripts" / "serve.py", "start", "--foreground", "--authenticated_by", "test"]
    command += ["--mar", mar, "--run_dir", run_dir, "--inference_port", inference, "--management_port", management]
    command += ["--grpc_inference_port", grpc_inference, "--grpc_management_port", grpc_management]
    process = subprocess.Popen([str(argument) for argument in command], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "server.json").is_file():  # written once TorchServe runs, before the model is ready
            assert process.poll() is None and time.monotonic() < deadline, control._log_tail(run_dir)
            time.sleep(0.2)
        torchserve = control.read_server(run_dir)["pid"]
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
        assert process.returncode == 0
        assert not psutil.pid_exists(torchserve) or psutil.Process(torchserve).status() == psutil.STATUS_ZOMBIE
    finally:
        if process.poll() is None:
            process.kill()
        control.stop_server(run_dir)


def _ping(url: str) -> bool:
    try:
        return requests.get(f"{url}/ping", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def _predict(url: str, image: bytes) -> requests.Response:
    return requests.post(f"{url}/predictions/{MODEL_NAME}", data=image, headers={"Content-Type": JPEG}, timeout=120)
