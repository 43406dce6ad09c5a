"""cloud/lambda_client.py, the Lambda function in front of the endpoint, called as Lambda calls it: with
API Gateway proxy events (a REST API's, and an HTTP API's payload format 2.0).

Against a local moto server (S3, and sagemaker-runtime's canned answers), and against a real endpoint:
TorchServe in SageMaker mode on loopback behind tests.aws_local.SageMakerRuntimeFront, which speaks
InvokeEndpoint to the function's boto3 client (AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME).
"""

import base64
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from bundle.predictor import Predictor
from cloud import lambda_client
from handler import control
from tests.aws_local import ACCOUNT, BUCKET, REGION, SageMakerRuntimeFront, free_port, local_aws, require
from tests.bundle_runs import REPO
from tests.serving import SERVED_FIELDS, bundle_with_random_weights
from tests.test_torchserve import _require_torchserve

ENDPOINT = "skin-lesion"
JPEG = "image/jpeg"


def rest_api_event(body: bytes, content_type: str, method: str = "POST", encoded: bool = True) -> dict:
    """An API Gateway REST API proxy event (binary media types on: the body arrives base64-encoded)."""
    headers = {"Content-Type": content_type, "Host": "abc123.execute-api.eu-west-1.amazonaws.com"}
    return {
        "resource": "/classify",
        "path": "/classify",
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/classify",
            "httpMethod": method,
            "path": "/prod/classify",
            "stage": "prod",
            "accountId": ACCOUNT,
            "apiId": "abc123",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "identity": {"sourceIp": "198.51.100.7", "userAgent": "curl/8.5.0"},
        },
        "body": base64.b64encode(body).decode() if encoded else body.decode(),
        "isBase64Encoded": encoded,
    }


def http_api_event(body: bytes, content_type: str, method: str = "POST") -> dict:
    """An API Gateway HTTP API event, payload format 2.0 (lower-case headers; JSON arrives as text)."""
    text = content_type.startswith("application/json")
    return {
        "version": "2.0",
        "routeKey": "POST /classify",
        "rawPath": "/classify",
        "rawQueryString": "",
        "headers": {"content-type": content_type, "host": "abc123.execute-api.eu-west-1.amazonaws.com"},
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": "abc123",
            "domainName": "abc123.execute-api.eu-west-1.amazonaws.com",
            "http": {
                "method": method,
                "path": "/classify",
                "protocol": "HTTP/1.1",
                "sourceIp": "198.51.100.7",
                "userAgent": "curl/8.5.0",
            },
            "requestId": "JKJaXmPLvHcESHA=",
            "routeKey": "POST /classify",
            "stage": "$default",
            "timeEpoch": 1796441199950,
        },
        "body": body.decode() if text else base64.b64encode(body).decode(),
        "isBase64Encoded": not text,
    }


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    require("boto3")
    with local_aws(tmp_path_factory.mktemp("aws")) as env:
        yield env


@pytest.fixture(autouse=True)
def function_environment(aws, monkeypatch):
    """The function's settings; its clients made anew, as in a fresh execution environment."""
    monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
    lambda_client.clients.cache_clear()
    yield
    lambda_client.clients.cache_clear()


@pytest.fixture(scope="module")
def image(synthetic_dir) -> bytes:
    return sorted((synthetic_dir / "images").glob("*.jpg"))[0].read_bytes()


def s3_object(data: bytes, key: str) -> str:
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def queue_endpoint_answers(aws: dict, *answers: bytes) -> None:
    """What moto's sagemaker-runtime answers next, through its own configuration API."""
    results = [{"Body": answer.decode(), "ContentType": "application/json"} for answer in answers]
    requests.post(
        f"{aws['AWS_ENDPOINT_URL']}/moto-api/static/sagemaker/endpoint-results",
        json={"account_id": ACCOUNT, "region": REGION, "results": results},
        timeout=30,
    ).raise_for_status()


# An answer with fields this function has never heard of: it must pass them through.
ANSWER = json.dumps(
    {"class": "nv", "probabilities": {"nv": 0.9, "mel": 0.1}, "refer": False, "ood": {"score": 0.2, "flag": False}},
    indent=1,
).encode()


def test_the_endpoints_answer_comes_back_byte_for_byte_through_both_kinds_of_api(aws, image):
    """moto's runtime reads every request body as UTF-8 text, so a JPEG's bytes cannot reach it: here the
    image travels as the endpoint's JSON (passed on as it is); raw bytes and S3 go to the real endpoint below."""
    request = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    queue_endpoint_answers(aws, ANSWER)  # moto answers the same request the same way again
    for event in (
        rest_api_event(request, "application/json", encoded=False),
        http_api_event(request, "application/json"),
    ):
        assert lambda_client.handler(event, None) == {
            "statusCode": 200,
            "headers": {"Content-Type": "application/json"},
            "body": ANSWER.decode(),
            "isBase64Encoded": False,
        }


@pytest.mark.parametrize(
    "case, status, expected",
    [
        ("GET", 405, "use POST, not GET"),
        ("empty body", 400, "no image"),
        ("bad base64", 400, "the body is not valid base64"),
        ("bad JSON", 400, "invalid JSON"),
        ("bad S3 URI", 400, "is not an S3 object URI"),
        ("missing S3 object", 404, "cannot read s3://skin-lesion-test/incoming/none.jpg"),
        ("too large", 413, "the endpoint takes at most 6291456"),
        ("S3 object too large", 413, "the endpoint takes at most 6291456"),
    ],
)
def test_requests_without_a_usable_image_are_refused_before_the_endpoint(aws, image, case, status, expected):
    def s3_request(uri) -> dict:
        return http_api_event(json.dumps({"s3_uri": uri}).encode(), "application/json")

    event = {
        "GET": lambda: rest_api_event(image, JPEG, method="GET"),
        "empty body": lambda: rest_api_event(b"", JPEG),
        "bad base64": lambda: {**rest_api_event(image, JPEG), "body": "not base64!"},
        "bad JSON": lambda: http_api_event(b'{"s3_uri": ', "application/json"),
        "bad S3 URI": lambda: s3_request("https://example.com/lesion.jpg"),
        "missing S3 object": lambda: s3_request(f"s3://{BUCKET}/incoming/none.jpg"),
        "too large": lambda: rest_api_event(b"\xff" * (lambda_client.MAX_IMAGE_BYTES + 1), JPEG),
        "S3 object too large": lambda: s3_request(s3_object(b"\xff" * (lambda_client.MAX_IMAGE_BYTES + 1), "big.jpg")),
    }[case]()
    answer = lambda_client.handler(event, None)
    assert answer["statusCode"] == status
    assert expected in json.loads(answer["body"])["error"]


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    _require_torchserve()
    return bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=[32, 32])


@pytest.fixture(scope="module")
def torchserve(bundle_root, tmp_path_factory):
    """The bundle's archive served by TorchServe in SageMaker mode (/ping and /invocations, no token)."""
    store = tmp_path_factory.mktemp("store")
    packaged = subprocess.run(
        [sys.executable, "scripts/package_mar.py", "--bundle_root", str(bundle_root), "--export_path", str(store)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert packaged.returncode == 0, packaged.stdout + packaged.stderr
    run_dir = tmp_path_factory.mktemp("run")
    inference, management, grpc_inference, grpc_management = (free_port() for _ in range(4))
    try:
        server = control.start_server(
            store / "skin_lesion.mar",
            run_dir,
            inference_port=inference,
            management_port=management,
            grpc_inference_port=grpc_inference,
            grpc_management_port=grpc_management,
            sagemaker=True,
            timeout_s=240,
        )
        yield server["inference_url"]
    finally:
        control.stop_server(run_dir)


@pytest.fixture(scope="module")
def front(torchserve):
    """sagemaker-runtime on loopback: the endpoint, and one whose instance is gone (nothing listens)."""
    runtime = SageMakerRuntimeFront({ENDPOINT: torchserve, "gone": f"http://127.0.0.1:{free_port()}"})
    with runtime as url:
        runtime.url = url
        yield runtime


@pytest.fixture
def real_endpoint(front, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", front.url)
    front.calls.clear()
    yield front
    front.throttle(0)
    front.delay(0)


def test_a_real_image_round_trips_through_the_function_and_a_real_endpoint(
    real_endpoint, torchserve, bundle_root, image
):
    direct = requests.post(f"{torchserve}/invocations", data=image, headers={"Content-Type": JPEG}, timeout=120)
    assert direct.status_code == 200, direct.text
    through_rest_api = lambda_client.handler(rest_api_event(image, JPEG), None)
    assert through_rest_api["statusCode"] == 200, through_rest_api
    assert through_rest_api["body"] == direct.text  # the endpoint's answer, unchanged
    answer = json.loads(through_rest_api["body"])
    assert set(answer) == SERVED_FIELDS
    (expected,) = Predictor(bundle_root, device="cpu").predict([image])
    assert answer["class"] == expected.to_json()["class"]
    np.testing.assert_allclose(
        list(answer["probabilities"].values()), list(expected.to_json()["probabilities"].values()), atol=1e-5
    )
    # the same image from S3, through an HTTP API
    uri = s3_object(image, "incoming/real.jpg")
    through_s3 = lambda_client.handler(http_api_event(json.dumps({"s3_uri": uri}).encode(), "application/json"), None)
    assert (through_s3["statusCode"], through_s3["body"]) == (200, direct.text)
    assert real_endpoint.calls == [ENDPOINT, ENDPOINT]


@pytest.mark.parametrize(
    "body, content_type",
    [(b"\xff\xd8\xff\xe0 not really a JPEG", JPEG), (b'{"image": "not base64!"}', "application/json")],
    ids=["broken JPEG", "JSON with bad base64"],
)
def test_a_bad_image_comes_back_as_the_endpoints_own_4xx(real_endpoint, torchserve, body, content_type):
    direct = requests.post(f"{torchserve}/invocations", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert 400 <= direct.status_code < 500
    answer = lambda_client.handler(http_api_event(body, content_type), None)
    assert answer["statusCode"] == direct.status_code
    assert json.loads(answer["body"]) == direct.json()
    assert real_endpoint.calls == [ENDPOINT]  # a client error is not retried


def test_a_briefly_throttled_endpoint_is_retried_by_the_sdk_and_answers(real_endpoint, image):
    real_endpoint.throttle(2)
    answer = lambda_client.handler(rest_api_event(image, JPEG), None)
    assert answer["statusCode"] == 200, answer
    assert real_endpoint.calls == [ENDPOINT] * 3


def test_a_slow_endpoint_is_a_504_within_the_functions_own_time(real_endpoint, image):
    """Each try gets its share of what the function has left, less the time to answer: with 7 s left, 3 tries
    of 1 s against an endpoint taking 2.5 s end in this function's 504, not in Lambda's timeout."""

    class LambdaContext:  # what the runtime hands the function
        def get_remaining_time_in_millis(self) -> int:
            return 7_000

    real_endpoint.delay(2.5)
    started = time.monotonic()
    answer = lambda_client.handler(rest_api_event(image, JPEG), LambdaContext())
    assert answer["statusCode"] == 504 and "did not answer in time" in json.loads(answer["body"])["error"]
    assert time.monotonic() - started < 7 - lambda_client.ANSWER_MARGIN_S + 1
    assert real_endpoint.calls == [ENDPOINT] * 3  # a read timeout is retried like a dropped connection
    assert lambda_client.read_timeout(None) == 70  # outside Lambda: the endpoint's own 60 s, and some


@pytest.mark.parametrize(
    "endpoint, throttled, status, code",
    [
        (ENDPOINT, 100, 503, "ThrottlingException"),
        ("gone", 0, 503, "ServiceUnavailable"),
        ("deleted", 0, 502, "ValidationError"),
    ],
    ids=["throttled", "instance gone", "no such endpoint"],
)
def test_a_throttled_or_failing_endpoint_is_a_json_502_or_503(
    real_endpoint, monkeypatch, image, endpoint, throttled, status, code
):
    monkeypatch.setenv("ENDPOINT_NAME", endpoint)
    real_endpoint.throttle(throttled)
    answer = lambda_client.handler(rest_api_event(image, JPEG), None)
    assert answer["statusCode"] == status
    assert answer["headers"]["Content-Type"] == "application/json"
    assert code in json.loads(answer["body"])["error"]
    # botocore's standard mode tries a throttled or unavailable call 3 times, an invalid one once
    assert len(real_endpoint.calls) == (1 if code == "ValidationError" else 3)
