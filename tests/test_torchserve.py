"""The archive served by the real TorchServe (Java frontend, Python workers) on loopback, on free ports.

Skipped without Java or TorchServe, except under CI=true, where that is a failure.
"""

import base64
import concurrent.futures
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from bundle.labels import CLASS_LABELS, CLASS_NAMES
from bundle.predictor import Predictor
from bundle.sidecar import new_record, save_pair
from handler import control
from tests.bundle_runs import REPO
from tests.serving import (
    FLAGGED_FIELDS,
    JPEG,
    PNG,
    SERVED_FIELDS,
    bundle_with_random_weights,
    decoded_rgb,
    encode,
    fuzzed_requests,
    malformed_requests,
    mode_variants,
    nested_json,
    out_of_distribution_image,
    png_header,
    store_guard,
    store_triage_calibration,
    zero_filled_png,
)

BATCH_SIZE = 4
MAX_BATCH_DELAY_MS = 100
TOLERANCE = 1e-5
MAX_REQUEST_SIZE = 16 * 1024 * 1024  # handler/config.properties
MALFORMED_CORPUS_SIZE = 1_000
GOOD_P99_S = 2.0  # latency of good requests sent among the malformed ones
TRAINED_IMAGE_SIZE = [32, 32]  # not inference.json's 64 x 64: served predictions differ unless the worker reads it


def _require_torchserve() -> None:
    problems = []
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        problems.append("Java (17 or newer) is not installed")
    if not (Path(sys.executable).parent / "torchserve").is_file():
        problems.append("torchserve is not installed in this Python environment")
    if problems:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{'; '.join(problems)}: CI must run the TorchServe tests")
        pytest.skip("; ".join(problems))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _package(bundle_root: Path, export_path: Path, **options) -> Path:
    command = [
        sys.executable,
        "scripts/package_mar.py",
        "--bundle_root",
        str(bundle_root),
        "--export_path",
        str(export_path),
        *(f"--{key}={value}" for key, value in options.items()),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return export_path / "skin_lesion.mar"


def _serve(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """scripts/serve.py as users run it; its own output is small, and the server's goes to the run folder."""
    return subprocess.run(
        [sys.executable, "scripts/serve.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _port_flags(**ports: int) -> list[str]:
    """``serve.py start``'s flag for each port given: ``inference=8080`` -> ``--inference_port 8080``."""
    return [flag for name, port in ports.items() for flag in (f"--{name}_port", str(port))]


def _start_args(mar: Path, run_dir: Path, *extra) -> list:
    inference, management, metrics, grpc_inference, grpc_management = _free_ports(5)
    ports = _port_flags(
        inference=inference,
        management=management,
        metrics=metrics,
        grpc_inference=grpc_inference,
        grpc_management=grpc_management,
    )
    return ["start", "--mar", mar, "--run_dir", run_dir, *ports, "--timeout_s", 240, *extra]


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory, images, synthetic_dir) -> Path:
    """Random weights trained at TRAINED_IMAGE_SIZE, with a calibration whose rule and refer threshold show in
    the answers to ``images`` (tests.serving.store_triage_calibration), and an out-of-distribution guard fitted
    on the synthetic set (tests.serving.store_guard)."""
    _require_torchserve()
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle_root"), trained_image_size=TRAINED_IMAGE_SIZE)
    store_triage_calibration(root, list(images.values()))
    store_guard(root, synthetic_dir)
    return root


@pytest.fixture(scope="module")
def archive(bundle_root, tmp_path_factory) -> Path:
    return _package(
        bundle_root, tmp_path_factory.mktemp("dist"), batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS
    )


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    """One TorchServe (token auth on) for the module, stopped whatever happens."""
    run_dir = tmp_path_factory.mktemp("run")
    try:
        result = _serve(*_start_args(archive, run_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "serving skin_lesion" in result.stdout
        yield {**control.read_server(run_dir), "run_dir": run_dir}
    finally:
        control.stop_server(run_dir)


@pytest.fixture(scope="module")
def images(synthetic_dir) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((synthetic_dir / "images").glob("*.jpg"))[:6]}


@pytest.fixture(scope="module")
def expected(bundle_root, images) -> dict[str, dict]:
    """What the predictor, run here in the test process at the sidecar's image size, says about each image."""
    predictor = Predictor(bundle_root, device="cpu")
    assert predictor.image_size == TRAINED_IMAGE_SIZE
    return {
        name: result.to_json() for name, result in zip(images, predictor.predict(list(images.values())), strict=True)
    }


def _post(server: dict, route: str = "predictions/skin_lesion", authorised: bool = True, **kwargs) -> requests.Response:
    headers = {**kwargs.pop("headers", {}), **(control.auth_headers(server["run_dir"]) if authorised else {})}
    return requests.post(f"{server['inference_url']}/{route}", headers=headers, timeout=120, **kwargs)


def _worker_pids(server: dict) -> list[int]:
    response = requests.get(
        f"{server['management_url']}/models/skin_lesion",
        headers=control.auth_headers(server["run_dir"], "management"),
        timeout=30,
    )
    response.raise_for_status()
    return sorted(worker["pid"] for worker in response.json()[0]["workers"])


def _assert_same_prediction(answer: dict, expected: dict) -> None:
    assert (answer["class"], answer["label"]) == (expected["class"], CLASS_LABELS[expected["class"]])
    assert list(answer["probabilities"]) == list(CLASS_NAMES)
    np.testing.assert_allclose(
        list(answer["probabilities"].values()), list(expected["probabilities"].values()), rtol=0, atol=TOLERANCE
    )
    assert answer["probability"] == pytest.approx(expected["probability"], abs=TOLERANCE)
    # the triage answer and the rule that chose the class, as the Predictor gives them
    assert set(answer) == set(expected) == SERVED_FIELDS
    assert answer["malignant_probability"] == pytest.approx(expected["malignant_probability"], abs=TOLERANCE)
    for field in ("decision_rule", "most_probable_class", "refer", "refer_threshold", "out_of_distribution"):
        assert answer[field] == expected[field], field
    assert answer["ood_score"] == pytest.approx(expected["ood_score"], rel=1e-4)


def test_the_archive_holds_the_sidecar_at_its_root_beside_the_weights(archive):
    """TorchServe extracts the archive to the handler's model_dir, where the Predictor looks for model.json."""
    with zipfile.ZipFile(archive) as mar:
        assert {"model.pt", "model.json"} <= set(mar.namelist())
        sidecar = json.loads(mar.read("model.json"))
    assert sidecar["image_size"] == TRAINED_IMAGE_SIZE
    assert sidecar["calibration"]["refer_threshold"] is not None, "the refer threshold travels with the weights"


def test_served_predictions_equal_the_predictor(server, images, expected):
    answers = []
    for name, data in images.items():
        response = _post(server, data=data, headers={"Content-Type": JPEG})
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        _assert_same_prediction(response.json(), expected[name])
        answers.append(response.json())
    # the sidecar's rule and refer threshold reached the worker: both referrals, and a class the rule chose
    # over the most probable one, each saying so
    assert {answer["refer"] for answer in answers} == {True, False}
    assert all(answer["refer"] is (answer["malignant_probability"] >= answer["refer_threshold"]) for answer in answers)
    assert all(answer["decision_rule"] == "balanced" for answer in answers)
    assert any(answer["class"] != answer["most_probable_class"] for answer in answers)


def test_invocations_route_answers_like_predictions(server, images, expected):
    name, data = next(iter(images.items()))
    response = _post(server, "invocations", data=data, headers={"Content-Type": JPEG})
    assert response.status_code == 200, response.text
    _assert_same_prediction(response.json(), expected[name])


def test_multipart_json_untyped_and_png_requests_are_accepted(server, images, expected):
    name, data = next(iter(images.items()))
    png = encode(decoded_rgb(data), "PNG")
    requests_ = {
        "multipart": {"files": {"data": ("lesion.jpg", data, JPEG)}},
        "json": {"json": {"image": base64.b64encode(data).decode()}},
        "json with wrapped base64": {"json": {"image": base64.encodebytes(data).decode()}},
        "no content type": {"data": data},
        "octet-stream": {"data": data, "headers": {"Content-Type": "application/octet-stream"}},
        "png": {"data": png, "headers": {"Content-Type": PNG}},
    }
    for kind, kwargs in requests_.items():
        response = _post(server, **kwargs)
        assert response.status_code == 200, (kind, response.text)
        _assert_same_prediction(response.json(), expected[name])  # PNG keeps the decoded JPEG's pixels


def test_non_rgb_images_are_classified(server, images):
    for name, data in mode_variants(decoded_rgb(next(iter(images.values())))).items():
        response = _post(server, data=data, headers={"Content-Type": PNG if name.endswith(".png") else JPEG})
        assert response.status_code == 200, (name, response.text)


def _phone_photo(data: bytes) -> bytes:
    """A 4000 x 3000 JPEG, the size phones save."""
    return encode(decoded_rgb(data).resize((4_000, 3_000)), "JPEG", quality=92)


def test_malformed_corpus_gets_4xx_errors_and_no_worker_restarts(server, images, expected):
    """Over 1,000 hostile requests, good ones interleaved: malformed ones get a 4xx JSON error, fuzzed ones
    a 2xx or a 4xx, good ones their prediction with a p99 under 2 s; no 5xx, no worker restarted."""
    good_jpeg = next(iter(images.values()))
    good_png = encode(decoded_rgb(good_jpeg), "PNG")
    malformed, fuzzed = malformed_requests(good_jpeg, good_png), fuzzed_requests(good_jpeg, good_png)
    assert len(malformed) + len(fuzzed) >= MALFORMED_CORPUS_SIZE
    jobs = [("malformed", name, kwargs) for name, kwargs in malformed.items()]
    jobs += [("fuzzed", name, kwargs) for name, kwargs in fuzzed.items()]
    random.Random(0).shuffle(jobs)
    phone = _phone_photo(good_jpeg)
    names = list(images)
    for i in range(0, len(jobs) + 1, 6):  # a good request among every five hostile ones, now and then a phone photo
        name = names[(i // 6) % len(names)]
        data = phone if (i // 6) % 10 == 9 else images[name]
        jobs.insert(i, ("good", "phone" if data is phone else name, {"data": data, "headers": {"Content-Type": JPEG}}))
    pids = _worker_pids(server)

    def send(job):
        started = time.monotonic()
        response = _post(server, **job[2])
        return response, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, jobs))
    wrong, latencies = {}, []
    for (kind, name, _), (response, seconds) in zip(jobs, answers, strict=True):
        status = response.status_code
        if kind == "good":
            latencies.append(seconds)
            if status != 200:
                wrong[f"good/{name}"] = (status, response.text[:200])
            elif name != "phone":
                _assert_same_prediction(response.json(), expected[name])
        elif not (400 <= status < 500 or (kind == "fuzzed" and 200 <= status < 300)):
            wrong[name] = (status, response.text[:200])
        elif status >= 400 and not response.json().get("error"):
            wrong[name] = (status, f"no error message: {response.text[:200]}")
    assert not wrong, wrong
    assert _worker_pids(server) == pids, "a worker was restarted"
    assert np.percentile(latencies, 99) < GOOD_P99_S, sorted(latencies)[-10:]


def test_hostile_headers_and_bodies_are_refused_quickly_and_a_phone_photo_is_classified(server, images):
    """Each of these once cost seconds or a 500: a 69-byte PNG claiming 1 x 25,000,000 pixels, JSON nested
    100,000 deep."""
    cases = {
        "png_claims_1x25000000": (
            {"data": png_header(1, 25_000_000), "headers": {"Content-Type": PNG}},
            400,
            "at least 16 pixels",
        ),
        "png_claims_3000x3000": (
            {"data": png_header(3_000, 3_000), "headers": {"Content-Type": PNG}},
            400,
            "corrupt PNG",
        ),
        "png_25_megapixels": (
            {"data": zero_filled_png(5_000, 5_000), "headers": {"Content-Type": PNG}},
            413,
            "PNG limit",
        ),
        "json_nested_list": (
            {"data": nested_json(100_000, False), "headers": {"Content-Type": "application/json"}},
            400,
            "nested too deeply",
        ),
        "json_nested_under_image": (
            {"data": nested_json(100_000, True), "headers": {"Content-Type": "application/json"}},
            400,
            "nested too deeply",
        ),
    }
    for name, (kwargs, status, words) in cases.items():
        started = time.monotonic()
        response = _post(server, **kwargs)
        assert (response.status_code, time.monotonic() - started < 2) == (status, True), (name, response.text)
        assert words in response.json()["error"], (name, response.text)
    started = time.monotonic()
    response = _post(server, data=_phone_photo(next(iter(images.values()))), headers={"Content-Type": JPEG})
    assert response.status_code == 200 and time.monotonic() - started < 2, response.text


def test_status_codes_name_the_problem(server, images):
    good_jpeg = next(iter(images.values()))
    cases = {
        415: {"data": good_jpeg, "headers": {"Content-Type": "text/plain"}},
        400: {"json": {"image": "!!!"}},
        413: {"data": zero_filled_png(6000, 5000), "headers": {"Content-Type": PNG}},
    }
    refused = {}
    for status, kwargs in cases.items():
        response = _post(server, **kwargs)
        assert response.status_code == status, response.text
        refused[response.headers["x-request-id"]] = (status, response.json()["error"])
    # the model log names each refused request by the id its client got, with the status and the reason
    log = (server["run_dir"] / "logs" / "model_log.log").read_text()
    for request_id, (status, error) in refused.items():
        assert f"request {request_id} refused: {status} {error}" in log, request_id


def test_concurrent_batches_mixing_good_and_bad_images(server, images, expected):
    """Bad images sent alongside good ones from many threads: TorchServe batches them (batchSize > 1),
    and each request still gets its own answer."""
    rng = random.Random(0)
    bad = [b"", b"not an image", next(iter(images.values()))[:300], b"GIF89a"]
    jobs = [
        ("good", rng.choice(list(images))) if rng.random() < 0.5 else ("bad", rng.randrange(len(bad)))
        for _ in range(64)
    ]

    def send(job):
        kind, key = job
        return _post(server, data=images[key] if kind == "good" else bad[key], headers={"Content-Type": JPEG})

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(send, jobs))
    for (kind, key), response in zip(jobs, responses, strict=True):
        if kind == "good":
            assert response.status_code == 200, response.text
            _assert_same_prediction(response.json(), expected[key])
        else:
            assert 400 <= response.status_code < 500 and response.json()["error"], response.text
    batch_lines = [
        line
        for line in (server["run_dir"] / "logs" / "model_log.log").read_text().splitlines()
        if "requests:" in line and "classified" in line
    ]
    mixed = [
        line
        for line in batch_lines
        if "batch of 1 " not in line and " 0 classified" not in line and " 0 refused" not in line
    ]
    assert mixed, "no batch held good and bad images together:\n" + "\n".join(batch_lines[-20:])


def test_an_out_of_distribution_image_is_flagged_in_the_batch_of_lesions_answered_as_before(server, images, expected):
    """A green frame sent together with lesion images: TorchServe batches them, the frame gets a 200 without a
    diagnosis (the guard's fields and the reason) and every lesion its usual answer."""
    jobs = [("frame", out_of_distribution_image())] + [(name, data) for name, data in images.items()][: BATCH_SIZE - 1]
    jobs *= 4
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(lambda job: _post(server, data=job[1], headers={"Content-Type": JPEG}), jobs))
    for (name, _), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        if name == "frame":
            answer = response.json()
            assert set(answer) == FLAGGED_FIELDS and answer["class"] is None and answer["out_of_distribution"]
            assert answer["ood_method"] == "mahalanobis" and answer["ood_score"] > answer["ood_threshold"]
        else:
            _assert_same_prediction(response.json(), expected[name])
    batches = re.findall(
        r"batch of (\d+) requests: (\d+) classified, \d+ refused, (\d+) out of distribution",
        (server["run_dir"] / "logs" / "model_log.log").read_text(),
    )
    assert any(int(size) > 1 and int(flagged) for size, _, flagged in batches), batches


def test_ping_says_healthy(server):
    response = requests.get(
        f"{server['inference_url']}/ping", headers=control.auth_headers(server["run_dir"]), timeout=30
    )
    assert response.status_code == 200 and response.json()["status"] == "Healthy"


def test_token_auth_rejects_requests_without_the_right_key(server, images):
    data = next(iter(images.values()))
    without_key = _post(server, authorised=False, data=data, headers={"Content-Type": JPEG})
    wrong_key = _post(
        server, authorised=False, data=data, headers={"Content-Type": JPEG, "Authorization": "Bearer nope"}
    )
    management = requests.get(f"{server['management_url']}/models/skin_lesion", timeout=30)
    for response in (without_key, wrong_key, management):
        assert 400 <= response.status_code < 500, response.text
    assert control.read_inference_key(server["run_dir"])


def test_oversize_request_is_refused_by_the_frontend(server):
    response = _post(server, data=b"\xff" * (MAX_REQUEST_SIZE + 1024), headers={"Content-Type": JPEG})
    assert response.status_code == 413, response.text


def test_model_management_api_is_off(server, archive):
    response = requests.post(
        f"{server['management_url']}/models",
        params={"url": archive.name, "model_name": "other"},
        headers=control.auth_headers(server["run_dir"], "management"),
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text


def test_sagemaker_mode_serves_ping_and_invocations_without_a_token(archive, images, expected, tmp_path):
    run_dir = tmp_path / "run"
    try:
        result = _serve(*_start_args(archive, run_dir, "--sagemaker"))
        assert result.returncode == 0, result.stdout + result.stderr
        server = control.read_server(run_dir)
        assert requests.get(f"{server['inference_url']}/ping", timeout=30).status_code == 200
        name, data = next(iter(images.items()))
        response = requests.post(
            f"{server['inference_url']}/invocations", data=data, headers={"Content-Type": JPEG}, timeout=120
        )
        assert response.status_code == 200, response.text
        _assert_same_prediction(response.json(), expected[name])
        assert not (run_dir / "key_file.json").exists()
    finally:
        control.stop_server(run_dir)


@pytest.fixture(scope="module")
def broken_archive(bundle_root, tmp_path_factory) -> Path:
    """An archive whose weights are not a checkpoint: every worker dies loading it."""
    root = tmp_path_factory.mktemp("broken_bundle")
    shutil.copytree(bundle_root / "configs", root / "configs")
    (root / "models").mkdir()
    # weights with their own sidecar (packaging checks the pair) that are not this network's
    not_densenet = {"weight": torch.zeros(1)}
    save_pair(root / "models" / "model.pt", not_densenet, new_record(not_densenet, TRAINED_IMAGE_SIZE))
    return _package(root, tmp_path_factory.mktemp("broken_dist"), max_retry_timeout_s=5)


def test_start_fails_loudly_and_stops_the_server_when_the_model_cannot_load(broken_archive, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    try:
        result = _serve(*_start_args(broken_archive, run_dir))
        assert result.returncode != 0
        assert "the model failed to load" in result.stderr and "model_log.log" in result.stderr, result.stderr
        assert time.monotonic() - started < 120
        assert control._server_pid(run_dir) is None, "the failed server was left running"
    finally:
        control.stop_server(run_dir)


def test_ping_turns_unhealthy_once_workers_keep_failing_past_max_retry_timeout(broken_archive, tmp_path):
    """TorchServe 0.12's /ping stays 200 while a failing worker is within maxRetryTimeoutInSec of its first
    failure, then answers 500: the archive's short timeout is what makes it honest (see scripts/serve.py)."""
    run_dir = tmp_path / "run"
    (run_dir / "tmp").mkdir(parents=True)
    inference, management, metrics, grpc_inference, grpc_management = _free_ports(5)
    env = dict(
        os.environ,
        LOG_LOCATION=str(run_dir / "logs"),
        METRICS_LOCATION=str(run_dir / "logs"),
        TMPDIR=str(run_dir / "tmp"),
        TEMP=str(run_dir / "tmp"),
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{inference}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{management}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{metrics}",
        TS_GRPC_INFERENCE_PORT=str(grpc_inference),
        TS_GRPC_MANAGEMENT_PORT=str(grpc_management),
    )
    command = [
        str(Path(sys.executable).parent / "torchserve"),
        "--start",
        "--ncs",
        "--disable-token-auth",
        "--ts-config",
        str(control.TS_CONFIG),
        "--model-store",
        str(broken_archive.parent),
        "--models",
        f"skin_lesion={broken_archive.name}",
    ]
    try:
        with open(run_dir / "torchserve.out", "wb") as out:
            subprocess.run(
                command,
                cwd=run_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=120,
            )
        statuses, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline and 500 not in statuses:
            try:
                statuses.append(requests.get(f"http://127.0.0.1:{inference}/ping", timeout=10).status_code)
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert statuses and statuses[-1] == 500, statuses
        assert requests.get(f"http://127.0.0.1:{inference}/ping", timeout=10).json()["status"] == "Unhealthy"
    finally:
        control.stop_server(run_dir)


def test_the_predict_client_prints_a_sentence_per_image_and_refusals(server, tmp_path, images):
    good = tmp_path / "lesion.jpg"
    good.write_bytes(next(iter(images.values())))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    frame = tmp_path / "frame.jpg"
    frame.write_bytes(out_of_distribution_image())
    client = [
        sys.executable,
        "scripts/predict.py",
        str(good),
        str(bad),
        str(frame),
        "--run_dir",
        str(server["run_dir"]),
    ]
    result = subprocess.run(client, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # one image was refused
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        rf"{re.escape(str(good))}: class: [a-z /-]+, probability: \d+ percent \(balanced rule; most probable: "
        r"[a-z /-]+\), malignant probability: \d+ percent, refer: (yes|no)",
        lines[0],
    ), lines
    assert lines[1].startswith(f"{bad}: refused: ")
    assert lines[2].startswith(f"{frame}: no diagnosis: not answered: this image is unlike the dermoscopy images")
    raw = subprocess.run(
        [*client[:3], "--run_dir", str(server["run_dir"]), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    answer = json.loads(raw.stdout)
    assert raw.returncode == 0 and answer["status"] == 200 and answer["response"]["class"] in CLASS_NAMES
    # a folder stands for its images; a name that is neither stops the client before its first request
    folder = tmp_path / "folder"
    (folder / "__MACOSX").mkdir(parents=True)
    (folder / "__MACOSX" / "._lesion.jpg").write_bytes(b"\x00\x05")
    (folder / "lesion.jpg").write_bytes(good.read_bytes())
    listed = subprocess.run(
        [*client[:2], str(folder), "--run_dir", str(server["run_dir"])], cwd=REPO, capture_output=True, text=True
    )
    assert listed.returncode == 0 and listed.stdout.startswith(f"{folder / 'lesion.jpg'}: class: "), listed.stderr
    stopped = subprocess.run(
        [*client[:3], str(tmp_path / "gone.jpg"), "--run_dir", str(server["run_dir"])],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert stopped.returncode == 1 and not stopped.stdout
    assert f"error: {tmp_path / 'gone.jpg'} is neither an image file nor a folder of images" in stopped.stderr
