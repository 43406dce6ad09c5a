"""The SageMaker adapter's four functions, loaded from a model.tar.gz built by the packaging script."""

import base64
import http
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import requests
import torch
from PIL import Image

from bundle.labels import CLASS_LABELS
from bundle.predictor import Predictor
from bundle.synthetic import generate
from tests.bundle_runs import REPO
from tests.serving import (
    SERVED_FIELDS,
    bundle_with_random_weights,
    encode,
    sagemaker_model_dir,
    store_triage_calibration,
)

TRAINED_IMAGE_SIZE = [32, 32]  # not inference.json's 64 x 64: the sidecar must travel with the weights


def _package(bundle_root, archive) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/package_sagemaker.py", "--bundle_root", str(bundle_root), "--output", str(archive)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[bytes]:
    images = generate(tmp_path_factory.mktemp("images"), n_images=42, image_size=(64, 48), seed=3) / "images"
    return [path.read_bytes() for path in sorted(images.glob("*.jpg"))[:6]]


@pytest.fixture(scope="module")
def jpeg(jpegs) -> bytes:
    return jpegs[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, jpegs):
    """model.tar.gz built by scripts/package_sagemaker.py, extracted as the container does, from weights whose
    calibration's rule and refer threshold show in the answers to ``jpegs``."""
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=TRAINED_IMAGE_SIZE)
    store_triage_calibration(root, jpegs)
    return sagemaker_model_dir(root, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    spec = importlib.util.spec_from_file_location("sagemaker_inference_adapter", model_dir / "code" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_archive_has_the_container_layout(model_dir):
    for path in (
        "configs/inference.json",
        "models/model.pt",
        "models/model.json",
        "code/inference.py",
        "code/skin_lesion_handler.py",
        "code/requirements.txt",
        "code/bundle/predictor.py",
        "code/bundle/labels.py",
    ):
        assert (model_dir / path).is_file(), path
    # TorchServe in the container takes this handler over the toolkit's (tests/test_sagemaker_container.py)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    assert manifest["handler"] == "skin_lesion_handler.py" and manifest["serializedFile"] == "models/model.pt"
    assert manifest["modelVersion"] == "1.0"  # the version the toolkit's SAGEMAKER_TS_* settings are keyed by
    assert "monai==" in (model_dir / "code" / "requirements.txt").read_text()
    assert not list(model_dir.rglob("__pycache__"))


def test_the_container_serves_at_the_trained_image_size(adapter, model_dir):
    assert adapter.model_fn(str(model_dir)).image_size == TRAINED_IMAGE_SIZE


def test_the_toolkit_hands_model_fn_its_context_and_each_worker_takes_its_own_gpu(adapter, model_dir, monkeypatch):
    """A multi-GPU host gives each worker a gpu_id: without it, every worker would load onto the config's cuda:0."""
    from types import SimpleNamespace

    from sagemaker_inference.transformer import Transformer

    import bundle.predictor

    toolkit = Transformer()
    toolkit._context = SimpleNamespace(system_properties={"gpu_id": 1, "model_dir": str(model_dir)})
    assert toolkit._run_handler_function(adapter.model_fn, str(model_dir)).device == torch.device("cpu")  # no GPU here
    monkeypatch.setattr(bundle.predictor.torch.cuda, "is_available", lambda: True)
    assert bundle.predictor.worker_device(1) == "cuda:1" and bundle.predictor.worker_device(None) == "cpu"


def test_packaging_refuses_a_malformed_sidecar(tmp_path):
    root = bundle_with_random_weights(tmp_path / "bundle")
    (root / "models" / "model.json").write_text("{truncated")
    result = _package(root, tmp_path / "model.tar.gz")
    assert result.returncode != 0 and f"error: {root / 'models' / 'model.json'} (the sidecar of" in result.stderr
    assert not (tmp_path / "model.tar.gz").exists()


def test_the_four_functions_classify_like_the_predictor(adapter, model_dir, jpegs):
    model = adapter.model_fn(str(model_dir))
    predictor = Predictor(model_dir, model_dir / "models" / "model.pt")
    answers = []
    for jpeg in jpegs:
        body, content_type = adapter.output_fn(
            adapter.predict_fn(adapter.input_fn(jpeg, "image/jpeg"), model), "application/json"
        )
        answer = json.loads(body)
        assert content_type == "application/json"
        assert set(answer) == SERVED_FIELDS
        expected = predictor.predict([jpeg])[0].to_json()
        assert answer["class"] == expected["class"]
        assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert answer["malignant_probability"] == pytest.approx(expected["malignant_probability"], abs=1e-6)
        for field in ("decision_rule", "most_probable_class", "refer", "refer_threshold"):
            assert answer[field] == expected[field], field
        answers.append(answer)
    # the archive's sidecar carries the rule and the refer threshold: both referrals occur, and the class the
    # rule chose over the most probable one is shown beside it
    assert {answer["refer"] for answer in answers} == {True, False}
    assert {answer["decision_rule"] for answer in answers} == {"balanced"}
    assert any(answer["class"] != answer["most_probable_class"] for answer in answers)


def test_json_base64_input_gives_the_same_answer(adapter, model_dir, jpeg):
    model = adapter.model_fn(str(model_dir))
    raw = adapter.output_fn(adapter.predict_fn(adapter.input_fn(jpeg, "image/jpeg"), model), "*/*")[0]
    as_json = json.dumps({"image": base64.b64encode(jpeg).decode()})
    via_json = adapter.output_fn(adapter.predict_fn(adapter.input_fn(as_json, "application/json"), model), "*/*")[0]
    assert json.loads(via_json) == json.loads(raw)


@pytest.mark.parametrize(
    "body, content_type, status",
    [
        (b"", "image/jpeg", 400),
        (b"not an image", "image/png", 400),
        (b"{not json", "application/json", 400),
        (json.dumps({"image": "***"}), "application/json", 400),
        (encode(Image.new("RGB", (32, 32)), "GIF"), "image/gif", 415),  # the bytes name the format
    ],
)
def test_bad_requests_are_refused_with_a_4xx_and_a_reason(adapter, model_dir, body, content_type, status):
    model = adapter.model_fn(str(model_dir))
    with pytest.raises(adapter.ToolkitError) as refused:
        adapter.output_fn(adapter.predict_fn(adapter.input_fn(body, content_type), model), "application/json")
    assert refused.value.status_code == status
    assert json.loads(refused.value.message)["error"]


def test_an_image_over_the_pixel_limit_is_413(adapter, model_dir):
    model = adapter.model_fn(str(model_dir))
    huge = encode(Image.new("RGB", (6000, 5000)), "PNG")
    with pytest.raises(adapter.ToolkitError) as refused:
        adapter.output_fn(adapter.predict_fn(adapter.input_fn(huge, "image/png"), model), "application/json")
    assert refused.value.status_code == http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def test_an_unacceptable_accept_header_is_406(adapter, model_dir, jpeg):
    model = adapter.model_fn(str(model_dir))
    with pytest.raises(adapter.ToolkitError) as refused:
        adapter.output_fn(adapter.predict_fn(adapter.input_fn(jpeg, "image/jpeg"), model), "text/csv, text/html;q=0.9")
    assert refused.value.status_code == 406


@pytest.mark.parametrize(
    "accept",
    [
        "application/json, text/plain, */*",  # axios's default
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # a browser's
        "Application/JSON",
        "application/*",
        "application/json; charset=utf-8",
        "",
    ],
)
def test_an_accept_header_listing_json_among_others_gets_json(adapter, model_dir, jpeg, accept):
    model = adapter.model_fn(str(model_dir))
    body, content_type = adapter.output_fn(adapter.predict_fn(adapter.input_fn(jpeg, "image/jpeg"), model), accept)
    assert content_type == "application/json" and json.loads(body)["class"]


def test_the_predict_client_reads_a_sagemaker_endpoint(adapter, model_dir, jpeg, tmp_path):
    """scripts/predict.py --endpoint against a local moto SageMaker runtime answering with the adapter's output."""
    from moto.server import ThreadedMotoServer

    body, content_type = adapter.output_fn(
        adapter.predict_fn(adapter.input_fn(jpeg, "image/jpeg"), adapter.model_fn(str(model_dir))), "application/json"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    aws = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    aws.start()
    try:
        endpoint_url = f"http://127.0.0.1:{port}"
        requests.post(
            f"{endpoint_url}/moto-api/static/sagemaker/endpoint-results",
            timeout=10,
            json={
                "account_id": "123456789012",
                "region": "eu-west-1",
                "results": [{"Body": body, "ContentType": content_type}],
            },
        ).raise_for_status()
        image = tmp_path / "lesion.jpg"
        image.write_bytes(jpeg)
        env = dict(
            os.environ, AWS_ENDPOINT_URL=endpoint_url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"
        )
        # --as_json: moto's server decodes request bodies as UTF-8, so raw JPEG bytes can't pass through it
        result = subprocess.run(
            [
                sys.executable,
                "scripts/predict.py",
                str(image),
                "--endpoint",
                "skin-lesion",
                "--region",
                "eu-west-1",
                "--as_json",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        aws.stop()
    answer = json.loads(body)
    assert result.returncode == 0, result.stderr
    assert answer["class"] != answer["most_probable_class"], "this archive's rule picks the least probable class"
    refer = "yes" if answer["refer"] else "no"
    assert result.stdout.strip() == (
        f"{image}: class: {answer['label']}, probability: {round(100 * answer['probability'])} percent "
        f"(balanced rule; most probable: {CLASS_LABELS[answer['most_probable_class']]}), "
        f"malignant probability: {round(100 * answer['malignant_probability'])} percent, refer: {refer}"
    )
