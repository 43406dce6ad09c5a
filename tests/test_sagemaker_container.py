"""model.tar.gz served by AWS's PyTorch inference toolkit as the container runs it, with batching on.

``sagemaker_pytorch_serving_container.serving.main()`` over the extracted archive starts TorchServe with
``SAGEMAKER_TS_BATCH_SIZE=4``: good and bad requests sent together must each get their own answer.
Skipped without Java or the toolkit, except under CI=true, where that is a failure.
"""

import base64
import concurrent.futures
import email
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
import requests
from PIL import Image

from bundle.synthetic import generate
from tests.aws_local import inference_toolkit, inference_wheels, pinned_requirements, require
from tests.bundle_runs import REPO
from tests.serving import (
    FLAGGED_FIELDS,
    JPEG,
    PNG,
    bundle_with_random_weights,
    encode,
    out_of_distribution_image,
    sagemaker_model_dir,
    store_guard,
    store_triage_calibration,
)

BATCH_SIZE = 4
# Long enough that requests sent together land in one batch on a busy 2-core machine.
MAX_BATCH_DELAY_MS = 1500
TRAINED_IMAGE_SIZE = [32, 32]
ROUNDS = 3


def _require_java() -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Java (17 or newer) is not installed: CI must run the SageMaker container tests")
        pytest.skip("Java (17 or newer) is not installed")


@pytest.fixture(scope="module")
def packaged(tmp_path_factory, good, synthetic_dir):
    """The archive package_sagemaker.py builds from weights named best.pt (with their sidecar best.json), with a
    calibration whose rule and refer threshold show in the answers to the ``good`` images, and an
    out-of-distribution guard fitted on the synthetic set."""
    _require_java()
    require("sagemaker_pytorch_serving_container")
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=TRAINED_IMAGE_SIZE)
    images = [request["data"] for request in good.values() if "data" in request]
    images += [base64.b64decode(request["json"]["image"]) for request in good.values() if "json" in request]
    store_triage_calibration(root, images)
    store_guard(root, synthetic_dir)
    (root / "models" / "model.pt").rename(root / "models" / "best.pt")
    (root / "models" / "model.json").rename(root / "models" / "best.json")
    return sagemaker_model_dir(root, tmp_path_factory.mktemp("dist"), "--weights", str(root / "models" / "best.pt"))


@pytest.fixture(scope="module")
def container(packaged, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("toolkit")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAGEMAKER_TS_BATCH_SIZE", str(BATCH_SIZE))
        env.setenv("SAGEMAKER_TS_MAX_BATCH_DELAY", str(MAX_BATCH_DELAY_MS))
        with inference_toolkit(packaged, scratch) as url:
            yield {"url": url, "logs": scratch / "logs", "scratch": scratch}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, dict]:
    """Good requests in every accepted form: raw JPEG, raw PNG, JSON base64, raw bytes without a type."""
    images = sorted(
        (generate(tmp_path_factory.mktemp("images"), n_images=42, image_size=(64, 48), seed=3) / "images").glob("*.jpg")
    )
    jpegs = [path.read_bytes() for path in images[:3]]
    with Image.open(images[3]) as image:
        png = encode(image.convert("RGB"), "PNG")
    return {
        "raw_jpeg": {"data": jpegs[0], "headers": {"Content-Type": JPEG}},
        "raw_png": {"data": png, "headers": {"Content-Type": PNG}},
        "json_base64": {"json": {"image": base64.b64encode(jpegs[1]).decode()}},
        "octet_stream": {"data": jpegs[2], "headers": {"Content-Type": "application/octet-stream"}},
    }


BAD = {  # name: (request, status)
    "garbage_png": ({"data": b"not an image at all", "headers": {"Content-Type": PNG}}, 400),
    "broken_json": ({"data": b'{"image": ', "headers": {"Content-Type": "application/json"}}, 400),
    "gif": ({"data": encode(Image.new("RGB", (8, 8)), "GIF"), "headers": {"Content-Type": JPEG}}, 415),
}


def _post(url: str, request: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", timeout=120, **request)


def _together(url: str, requests_by_name: dict[str, dict]) -> dict[str, requests.Response]:
    """Send every request at the same moment, one thread each."""
    start = threading.Barrier(len(requests_by_name))

    def send(request):
        start.wait()
        return _post(url, request)

    with concurrent.futures.ThreadPoolExecutor(len(requests_by_name)) as pool:
        futures = {name: pool.submit(send, request) for name, request in requests_by_name.items()}
        return {name: future.result() for name, future in futures.items()}


def _batches(logs) -> list[tuple[int, int, int]]:
    """(size, classified, refused) of every batch the handler logged."""
    pattern = re.compile(r"batch of (\d+) requests: (\d+) classified, (\d+) refused")
    return [tuple(map(int, match.groups())) for match in pattern.finditer((logs / "model_log.log").read_text())]


def _assert_clean_error(response: requests.Response, status: int, scratch) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()  # the whole body is JSON: no traceback appended
    assert set(body) == {"error"} and body["error"], body
    assert "Traceback" not in response.text and str(scratch) not in response.text and ".py" not in response.text


def test_good_and_bad_requests_in_one_batch_each_get_their_own_answer(container, good):
    url = container["url"]
    alone = {}
    for name, request in good.items():
        response = _post(url, request)
        assert response.status_code == 200, f"{name}: {response.status_code} {response.text}"
        alone[name] = response.json()
    # the triage answer through the toolkit: the sidecar's rule and refer threshold, as the Predictor serves them
    for answer in alone.values():
        assert answer["decision_rule"] == "balanced" and answer["most_probable_class"] in answer["probabilities"]
        assert answer["refer"] is (answer["malignant_probability"] >= answer["refer_threshold"])
    assert {answer["refer"] for answer in alone.values()} == {True, False}
    assert any(answer["class"] != answer["most_probable_class"] for answer in alone.values())
    frame = {"data": out_of_distribution_image(), "headers": {"Content-Type": JPEG}}
    for _ in range(ROUNDS):
        answers = _together(url, {**good, "frame": frame, **{name: request for name, (request, _) in BAD.items()}})
        # an image unlike any lesion: a valid request, answered without a diagnosis
        assert answers["frame"].status_code == 200, answers["frame"].text
        assert set(answers["frame"].json()) == FLAGGED_FIELDS and answers["frame"].json()["out_of_distribution"]
        for name in good:
            assert answers[name].status_code == 200, f"{name}: {answers[name].status_code} {answers[name].text}"
            assert answers[name].json()["class"] == alone[name]["class"]
            assert answers[name].json()["refer"] == alone[name]["refer"]
            assert answers[name].json()["out_of_distribution"] is alone[name]["out_of_distribution"] is False
            assert answers[name].json()["probabilities"] == pytest.approx(alone[name]["probabilities"], abs=1e-5)
        for name, (_, status) in BAD.items():
            _assert_clean_error(answers[name], status, container["scratch"])
    batches = _batches(container["logs"])
    assert max(size for size, _, _ in batches) <= BATCH_SIZE
    # the toolkit's settings reached TorchServe, and good and bad images did share batches
    assert any(classified and refused for _, classified, refused in batches), batches


def test_the_model_is_served_at_its_sidecar_size_from_weights_named_otherwise(packaged):
    """--weights best.pt is stored as models/model.pt beside its sidecar models/model.json and the guard file
    the sidecar names."""
    guard = json.loads((packaged / "models" / "model.json").read_text())["ood"]["file"]
    assert sorted(path.name for path in (packaged / "models").iterdir()) == sorted(["model.json", "model.pt", guard])
    sys.path.insert(0, str(packaged / "code"))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("packaged_inference", packaged / "code" / "inference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(packaged / "code"))
    assert module.model_fn(str(packaged)).image_size == TRAINED_IMAGE_SIZE


def test_the_predict_client_prints_each_refusal_cleanly(container, good, tmp_path):
    (tmp_path / "lesion.jpg").write_bytes(good["raw_jpeg"]["data"])
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    result = subprocess.run(
        [
            sys.executable,
            "scripts/predict.py",
            str(tmp_path / "lesion.jpg"),
            str(tmp_path / "broken.png"),
            "--url",
            container["url"],
            "--model",
            "model",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path / 'lesion.jpg'}: class: ")
    assert lines[1] == f"{tmp_path / 'broken.png'}: refused: not an image: expected JPEG or PNG bytes"
    assert "Traceback" not in result.stdout + result.stderr


def test_what_code_requirements_installs_keeps_the_inference_images_torch():
    """The toolkit pip-installs code/requirements.txt at every start: each pinned wheel's own requirements must
    accept the torch and Python of AWS's inference image, or pip replaces its torch (a multi-GB download) or fails."""
    from packaging.requirements import Requirement

    from cloud.aws import INFERENCE_FRAMEWORK

    torch_version, python = INFERENCE_FRAMEWORK
    environment = {"python_version": f"{python[2]}.{python[3:]}", "extra": ""}
    wheels = sorted(inference_wheels().glob("*.whl"))
    assert {wheel.name.split("-")[0].lower() for wheel in wheels} >= {name for name, _ in pinned_requirements()}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
            message = email.message_from_bytes(archive.read(metadata))
        needs = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
        for need in needs:
            if need.name == "torch" and (need.marker is None or need.marker.evaluate(environment)):
                assert need.specifier.contains(f"{torch_version}.0"), f"{wheel.name} needs torch {need.specifier}"
        requires_python = message.get("Requires-Python")
        if requires_python:
            assert Requirement(f"python{requires_python}").specifier.contains(environment["python_version"])
