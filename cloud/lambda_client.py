"""AWS Lambda in front of the SageMaker endpoint: an API Gateway proxy event carrying an image in, the
endpoint's JSON answer out.

Deployed as this one file (handler ``lambda_client.handler``); it needs only boto3, which the Lambda
Python runtime has. Settings, from the function's environment:
- ``ENDPOINT_NAME`` (required): the SageMaker endpoint to invoke;
- ``MAX_ATTEMPTS`` (default 3): tries per call, in botocore's standard retry mode (throttling, 5xx,
  connection errors and read timeouts are retried with backoff; nothing here loops); each try may take its
  share of the function's remaining time, less 3 s to answer;
- ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` / ``AWS_ENDPOINT_URL``: botocore's own overrides (a VPC endpoint,
  or a local one in tests).

The request (API Gateway REST API proxy events, or HTTP API payload format 1.0 or 2.0), POST only:
- the image itself: JPEG or PNG bytes, which API Gateway passes base64-encoded (``isBase64Encoded``);
- JSON ``{"s3_uri": "s3://bucket/key"}``: the image is read from S3 (the function's role needs
  ``s3:GetObject`` there);
- any other JSON (e.g. ``{"image": "<base64>"}``) goes to the endpoint as it is: the endpoint decides.

The answer is the endpoint's body, byte for byte: class, calibrated probabilities, triage, and whatever
fields the endpoint adds later. A refusal by the endpoint (a bad image) comes back with the endpoint's
own 4xx status and JSON body; a throttled or unreachable endpoint is a 503, a failing or misconfigured
one a 502, both with a JSON body ``{"error": ...}``; a request without a usable image is refused here
with a 4xx before the endpoint is called.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

# InvokeEndpoint's limit on a real-time request's payload.
MAX_IMAGE_BYTES = 6 * 1024 * 1024
JSON_TYPE = "application/json"
S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$")
# sagemaker-runtime's answers that mean "busy or not reachable now, try later" (after botocore's retries)
UNAVAILABLE = {
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "ServiceUnavailable",
    "ModelNotReadyException",
}


class Refusal(Exception):
    """A request this function answers itself, with ``status`` and a JSON error."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


ANSWER_MARGIN_S = 3  # of the function's time, kept back to answer when the endpoint is slow
ENDPOINT_LIMIT_S = 70  # outside Lambda: an endpoint has 60 s to answer


def attempts() -> int:
    return int(os.environ.get("MAX_ATTEMPTS", "3"))


def read_timeout(context) -> int:
    """Each try's share of the time the function has left, less ``ANSWER_MARGIN_S``: a slow endpoint then gets
    this function's 504, not the function's own timeout (API Gateway's generic error). Behind an HTTP API the
    function has 30 s (the integration's limit), so each of 3 tries gets 9 s."""
    if context is None:
        return ENDPOINT_LIMIT_S
    left = context.get_remaining_time_in_millis() / 1000 - ANSWER_MARGIN_S
    return max(1, min(ENDPOINT_LIMIT_S, int(left / attempts())))


@functools.cache
def clients(timeout: int = ENDPOINT_LIMIT_S):
    """The sagemaker-runtime and S3 clients, made once per execution environment and read timeout (warm calls
    reuse them: a function's time limit, and so the timeout, stays the same from call to call)."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": attempts()}, connect_timeout=5, read_timeout=timeout
    )
    return boto3.client("sagemaker-runtime", config=config), boto3.client("s3", config=config)


def handler(event: dict, context=None) -> dict:
    """The Lambda entry point: an API Gateway proxy event in, a proxy response out."""
    try:
        endpoint = os.environ.get("ENDPOINT_NAME")
        if not endpoint:
            raise Refusal(500, "the function has no ENDPOINT_NAME setting")
        runtime, s3 = clients(read_timeout(context))
        body, content_type = request_image(event, s3)
        return invoke(runtime, endpoint, body, content_type)
    except Refusal as refusal:
        return response(refusal.status, {"error": refusal.error})


def request_image(event: dict, s3) -> tuple[bytes, str]:
    """The request's payload for the endpoint and its content type; a Refusal when there is none."""
    method = event.get("httpMethod") or event.get("requestContext", {}).get("http", {}).get("method")
    if method != "POST":
        raise Refusal(405, f"use POST, not {method}")
    headers = {str(name).lower(): value for name, value in (event.get("headers") or {}).items()}
    content_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            payload = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as error:
            raise Refusal(400, f"the body is not valid base64: {error}") from None
    else:
        payload = body.encode()
    if not payload:
        raise Refusal(400, 'no image: send JPEG or PNG bytes, or JSON {"s3_uri": "s3://bucket/key"}')
    if len(payload) > MAX_IMAGE_BYTES:
        raise Refusal(413, f"the request is {len(payload)} bytes; the endpoint takes at most {MAX_IMAGE_BYTES}")
    if content_type == JSON_TYPE:
        try:
            document = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise Refusal(400, f"invalid JSON: {error}") from None
        if isinstance(document, dict) and "s3_uri" in document:
            return s3_image(document["s3_uri"], s3)
    return payload, content_type or "application/octet-stream"


def s3_image(uri, s3) -> tuple[bytes, str]:
    """The image at ``uri``, with a content type the endpoint sniffs (it reads JPEG and PNG by their bytes)."""
    match = S3_URI.match(uri) if isinstance(uri, str) else None
    if not match:
        raise Refusal(400, f"s3_uri {uri!r} is not an S3 object URI (s3://bucket/key)")
    try:
        head = s3.head_object(Bucket=match["bucket"], Key=match["key"])
        if head["ContentLength"] > MAX_IMAGE_BYTES:
            raise Refusal(413, f"{uri} is {head['ContentLength']} bytes; the endpoint takes at most {MAX_IMAGE_BYTES}")
        payload = s3.get_object(Bucket=match["bucket"], Key=match["key"])["Body"].read()
    except ClientError as error:
        code = error.response["Error"]["Code"]
        status = {"404": 404, "NoSuchKey": 404, "NoSuchBucket": 404, "403": 403, "AccessDenied": 403}.get(code, 502)
        raise Refusal(status, f"cannot read {uri}: {code}") from None
    return payload, "application/x-image"


def invoke(runtime, endpoint: str, payload: bytes, content_type: str) -> dict:
    """Invoke the endpoint and return its answer, or the error response its failure maps to."""
    try:
        answer = runtime.invoke_endpoint(
            EndpointName=endpoint, Body=payload, ContentType=content_type, Accept=JSON_TYPE
        )
    except ClientError as error:
        return endpoint_error(error)
    except (ConnectTimeoutError, ReadTimeoutError):
        return response(504, {"error": "the endpoint did not answer in time"})
    except BotoCoreError as error:
        return response(502, {"error": f"the endpoint could not be called: {type(error).__name__}"})
    return response(200, answer["Body"].read(), answer.get("ContentType") or JSON_TYPE)


def endpoint_error(error: ClientError) -> dict:
    """A failed InvokeEndpoint as the client should see it.

    ModelError carries the model's own answer: its 4xx (a bad image) goes back as it is; its 5xx is a
    502. Throttling and an unavailable endpoint are 503s (retried by botocore already); anything else
    (an unknown endpoint, denied access) is this service's misconfiguration: 502.
    """
    code = error.response.get("Error", {}).get("Code", "")
    if code == "ModelError":
        status = int(error.response.get("OriginalStatusCode") or 0)
        original = error.response.get("OriginalMessage") or ""
        if 400 <= status < 500:
            return response(status, original.encode(), JSON_TYPE if original.lstrip().startswith("{") else "text/plain")
        return response(502, {"error": "the model failed", "endpoint_status": status, "endpoint_answer": original})
    if code in UNAVAILABLE or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (429, 503):
        return response(503, {"error": f"the endpoint is busy or unavailable ({code}); retry later"}, retry_after=1)
    return response(502, {"error": f"the endpoint call failed ({code})"})


def response(status: int, body, content_type: str = JSON_TYPE, retry_after: int | None = None) -> dict:
    """An API Gateway proxy response; ``body`` is bytes sent as they are, or a dict sent as JSON."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    try:
        return {"statusCode": status, "headers": headers, "body": body.decode(), "isBase64Encoded": False}
    except UnicodeDecodeError:  # not text: API Gateway decodes a base64 body back to bytes
        return {
            "statusCode": status,
            "headers": headers,
            "body": base64.b64encode(body).decode(),
            "isBase64Encoded": True,
        }
