"""Prometheus metrics: the real TorchServe started by ``scripts/serve.py start --metrics_mode prometheus``, its
``/metrics`` scraped over HTTP and parsed with ``prometheus_client``'s text parser, as Prometheus would read it.

Skipped without Java or TorchServe, except under CI=true, where that is a failure.
"""

import concurrent.futures
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from handler import control
from tests.serving import (
    JPEG,
    PNG,
    bundle_with_random_weights,
    encode,
    out_of_distribution_image,
    store_guard,
    zero_filled_png,
)
from tests.test_serve_security import _listening
from tests.test_torchserve import _package, _require_torchserve, _serve, _start_args

# The names exposed, exactly as Prometheus stores them (what PromQL and a Kubernetes HPA query).
REQUESTS = "ts_inference_requests_total"
INFERENCE_LATENCY = "ts_inference_latency_microseconds"
QUEUE_LATENCY = "ts_queue_latency_microseconds"
CLASSIFIED = "skin_lesion_images_classified_total"
REFUSED = "skin_lesion_images_refused_total"
OUT_OF_DISTRIBUTION = "skin_lesion_out_of_distribution_total"
COUNTERS = (REQUESTS, INFERENCE_LATENCY, QUEUE_LATENCY, "Requests2XX", "Requests4XX", CLASSIFIED, REFUSED)
COUNTERS += (OUT_OF_DISTRIBUTION,)
LESIONS = 6
FRAMES = 2
# The model's counters reach /metrics through the worker's log, a moment after the answer.
SCRAPE_WAIT_S = 30


@pytest.fixture(scope="module")
def archive(tmp_path_factory, synthetic_dir) -> Path:
    """Random weights with an out-of-distribution guard fitted on the synthetic set, packaged."""
    _require_torchserve()
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle_root"))
    store_guard(root, synthetic_dir)
    return _package(root, tmp_path_factory.mktemp("dist"), batch_size=4, max_batch_delay_ms=100)


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    """One TorchServe in prometheus mode for the module, stopped whatever happens."""
    run_dir = tmp_path_factory.mktemp("run")
    try:
        result = _serve(*_start_args(archive, run_dir, "--metrics_mode", "prometheus"))
        assert result.returncode == 0, result.stdout + result.stderr
        server = control.read_server(run_dir)
        assert f"GET {server['metrics_url']}/metrics" in result.stdout
        yield {**server, "run_dir": run_dir}
    finally:
        control.stop_server(run_dir)


def _family(name: str) -> str:
    """The parser's name for the family of an exposed counter (it drops ``_total``)."""
    return name.removesuffix("_total")


def _scrape(server: dict) -> tuple[str, dict]:
    """/metrics as sent (no key) and parsed: {(family, frozenset of labels but Hostname): value} of every sample."""
    response = requests.get(f"{server['metrics_url']}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = frozenset((key, value) for key, value in sample.labels.items() if key.lower() != "hostname")
            samples[family.name, labels] = sample.value
    return response.text, samples


def _increase(before: dict, after: dict, family: str) -> dict[frozenset, float]:
    """How much each series of ``family`` grew between two scrapes (a new series from zero)."""
    return {
        labels: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name == _family(family) and value != before.get((name, labels), 0.0)
    }


def _by(label: str, increase: dict[frozenset, float]) -> Counter:
    """The increase of the model's series keyed by one label, checking the model's own labels on the way."""
    counts = Counter()
    for labels, value in increase.items():
        labels = dict(labels)
        assert (labels.pop("ModelName"), labels.pop("Level")) == ("skin_lesion", "Model"), labels
        counts[labels.get(label)] += int(value)
    return counts


def _refused_requests() -> dict[str, tuple[dict, int]]:
    """One request per refusal reason: reason -> (the request, the status it gets)."""
    gif = encode(Image.new("RGB", (64, 48), (120, 80, 60)), "GIF")
    tiny = encode(Image.new("RGB", (8, 8), (120, 80, 60)), "JPEG")
    return {
        "not_an_image": ({"data": b"plain text, not an image", "headers": {"Content-Type": JPEG}}, 400),
        "unsupported_format": ({"data": gif, "headers": {"Content-Type": "application/octet-stream"}}, 415),
        "bad_shape": ({"data": tiny, "headers": {"Content-Type": JPEG}}, 400),
        "too_large": ({"data": zero_filled_png(5_000, 5_000), "headers": {"Content-Type": PNG}}, 413),
        "unsupported_media_type": ({"data": tiny, "headers": {"Content-Type": "text/plain"}}, 415),
        "bad_request": ({"json": {"image": "not base64!"}}, 400),
    }


def test_metrics_count_requests_latency_and_the_models_outcomes(server, synthetic_dir):
    """Lesions, green frames and one bad request per refusal reason, sent concurrently (so batches mix them):
    /metrics grows by exactly what the answers said."""
    lesions = [path.read_bytes() for path in sorted((synthetic_dir / "images").glob("*.jpg"))[:LESIONS]]
    good = [{"data": data, "headers": {"Content-Type": JPEG}} for data in lesions]
    good += [{"data": out_of_distribution_image(), "headers": {"Content-Type": JPEG}}] * FRAMES
    refused = _refused_requests()
    jobs = good + [request for request, _ in refused.values()]
    headers = control.auth_headers(server["run_dir"])
    url = f"{server['inference_url']}/predictions/skin_lesion"

    def send(job: dict) -> requests.Response:
        return requests.post(url, **{**job, "headers": {**job.get("headers", {}), **headers}}, timeout=120)

    _, before = _scrape(server)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, jobs))
    answers = [response.json() for response in responses[: len(good)]]
    assert [response.status_code for response in responses] == [200] * len(good) + [
        status for _, status in refused.values()
    ], [response.text[:200] for response in responses]
    classes = Counter(answer["class"] or "none" for answer in answers)
    flagged = sum(bool(answer["out_of_distribution"]) for answer in answers)
    assert classes["none"] >= FRAMES and flagged >= FRAMES, "the guard flags the green frames"

    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        text, after = _scrape(server)
        counted = sum(_by("Class", _increase(before, after, CLASSIFIED)).values())
        counted += sum(_by("Reason", _increase(before, after, REFUSED)).values())
        if counted >= len(jobs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    for name in COUNTERS:  # the exposed names and types the HPA and dashboards rely on
        assert f"# TYPE {name} counter" in text, name
    model_series = frozenset({("model_name", "skin_lesion"), ("model_version", "default")})
    assert _increase(before, after, REQUESTS) == {model_series: len(jobs)}
    for latency in (INFERENCE_LATENCY, QUEUE_LATENCY):
        assert _increase(before, after, latency)[model_series] > 0, latency
    assert sum(_increase(before, after, "Requests4XX").values()) == len(refused)
    assert sum(_increase(before, after, "Requests2XX").values()) >= len(good)

    assert _by("Class", _increase(before, after, CLASSIFIED)) == classes
    assert _by("Reason", _increase(before, after, REFUSED)) == Counter(refused.keys())
    assert _by(None, _increase(before, after, OUT_OF_DISTRIBUTION)) == {None: flagged}


def test_metrics_need_no_key_and_listen_on_loopback_only(server):
    """The metrics port answers without a key (so it stays on loopback), while inference still needs one."""
    assert requests.get(f"{server['metrics_url']}/metrics", timeout=30).status_code == 200
    refused = requests.post(f"{server['inference_url']}/predictions/skin_lesion", data=b"", timeout=30)
    assert refused.status_code == 400 and control.KEY_REFUSED in refused.text
    metrics_port = int(server["metrics_url"].rsplit(":", 1)[1])
    assert {address for address in _listening(server["pid"]) if address[1] == metrics_port} == {
        ("127.0.0.1", metrics_port)
    }


def test_in_log_mode_the_counters_go_to_the_model_log_and_metrics_host_opens_the_port(archive, tmp_path):
    """Without --metrics_mode the counters reach logs/model_metrics.log, where log agents collect them, and the
    metrics port serves nothing; --metrics_host 0.0.0.0 (a pod that Prometheus scrapes) opens that port to
    every interface, which clients here still reach on loopback."""
    run_dir = tmp_path / "run"
    try:
        result = _serve(*_start_args(archive, run_dir, "--metrics_host", "0.0.0.0"))
        assert result.returncode == 0, result.stdout + result.stderr
        server = control.read_server(run_dir)
        response = requests.post(
            f"{server['inference_url']}/predictions/skin_lesion",
            data=b"plain text, not an image",
            headers={"Content-Type": JPEG, **control.auth_headers(run_dir)},
            timeout=120,
        )
        assert response.status_code == 400, response.text
        log = run_dir / "logs" / "model_metrics.log"
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while REFUSED not in (log.read_text() if log.is_file() else "") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert f"{REFUSED}.Count:1.0|#ModelName:skin_lesion,Level:Model,Reason:not_an_image|" in log.read_text()
        scrape = requests.get(f"{server['metrics_url']}/metrics", timeout=30)
        assert scrape.status_code == 200 and scrape.text == ""
        metrics_port = int(server["metrics_url"].rsplit(":", 1)[1])
        assert ("0.0.0.0", metrics_port) in _listening(server["pid"])
    finally:
        control.stop_server(run_dir)


@pytest.mark.parametrize(
    "options, named",
    [
        (["--metrics_mode", "prometheus"], "metrics_port"),
        (["--metrics_mode", "statsd", "--metrics_port", "9"], "metrics_mode"),
    ],
)
def test_serve_refuses_a_metrics_mode_it_cannot_serve(tmp_path, options, named):
    """Prometheus mode without a metrics port would expose nothing; an unknown mode is named, not ignored."""
    result = _serve("start", "--mar", tmp_path / "absent.mar", "--run_dir", tmp_path / "run", *options)
    assert result.returncode != 0
    assert named in result.stderr and "error:" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists(), "nothing was started"
