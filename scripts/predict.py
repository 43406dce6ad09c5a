"""Classify images with a served bundle: TorchServe over REST, or a SageMaker endpoint.

    python scripts/predict.py IMAGE_OR_FOLDER [...]                  # the server `scripts/serve.py start` runs
    python scripts/predict.py IMAGE --url http://host:8080 --key KEY # any TorchServe
    python scripts/predict.py IMAGE --endpoint NAME [--region eu-west-1]   # a SageMaker endpoint
    ... --json                     # one JSON line per image: {"image", "status", "response": the server's JSON}
    ... --as_json                      # send {"image": "<base64>"} instead of the raw bytes (for text-only gateways)

Prints, per image, ``IMAGE: class: basal cell carcinoma, probability: 92 percent (balanced rule),
malignant probability: 95 percent, refer: yes``; the rule's class is followed by the most probable one
when they differ (``(balanced rule; most probable: melanocytic nevus)``), and ``refer: n/a`` when the
served model has no refer threshold. An image the out-of-distribution guard flags prints ``IMAGE: no
diagnosis: not answered: this image is unlike the dermoscopy images ...`` (a valid answer, not a refusal).
A folder stands for every image under it (hidden files aside). Every name is checked before the first
request. Exits 1 when any image was refused, after printing each refusal's reason.
"""

import base64
import json
import sys
from pathlib import Path

import fire
import requests

from bundle.data import DatasetError, image_files
from bundle.labels import CLASS_LABELS
from handler import MODEL_NAME
from handler.control import DEFAULT_RUN_DIR, ServeError, authorised_request, read_server

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def _content_type(image: Path) -> str:
    try:
        return CONTENT_TYPES[image.suffix.lower()]
    except KeyError:
        sys.exit(f"{image}: expected a .jpg, .jpeg or .png file")


def _torchserve_sender(url: str | None, key: str | None, run_dir: str, model: str, timeout: float):
    server = read_server(run_dir) if url is None else None  # None: the server scripts/serve.py started

    def post(target: str, **kwargs) -> requests.Response:
        if server is None:
            return requests.post(
                target,
                headers={**kwargs.pop("headers"), **({"Authorization": f"Bearer {key}"} if key else {})},
                **kwargs,
            )
        if not server["token_auth"]:
            return requests.post(target, **kwargs)
        return authorised_request(run_dir, "POST", target, **kwargs)  # re-reads (and renews) an expired key

    def send(body: bytes, content_type: str) -> tuple[int, dict]:
        base = server["inference_url"] if server else url
        response = post(
            f"{base.rstrip('/')}/predictions/{model}",
            data=body,
            timeout=timeout,
            headers={"Content-Type": content_type},
        )
        return response.status_code, _answer(response.text)

    return send


def _answer(text: str) -> dict:
    """The response as JSON, or a one-line error: never a traceback or a whole HTML page."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        return answer
    line = next((line.strip() for line in text.splitlines() if line.strip()), "no response body")
    return {"error": line[:200]}


def _sagemaker_sender(endpoint: str, region: str | None):
    import boto3  # only this path needs the AWS SDK
    from botocore.exceptions import ClientError

    runtime = boto3.client("sagemaker-runtime", region_name=region)

    def send(body: bytes, content_type: str) -> tuple[int, dict]:
        try:
            response = runtime.invoke_endpoint(
                EndpointName=endpoint, ContentType=content_type, Accept="application/json", Body=body
            )
        except ClientError as error:  # SageMaker reports the model's 4xx as a ModelError with its body
            details = error.response.get("OriginalMessage") or error.response["Error"].get("Message", "")
            return error.response.get("OriginalStatusCode", 400), _answer(details)
        return 200, _answer(response["Body"].read().decode(errors="replace"))

    return send


def describe(status: int, answer: dict) -> str:
    if status == 200 and answer.get("out_of_distribution") and answer.get("class") is None:
        return f"no diagnosis: {answer.get('reason', 'flagged as out of distribution')}"
    if status == 200 and "label" in answer:
        sentence = f"class: {answer['label']}, probability: {_percent(answer['probability'])}"
        if "decision_rule" not in answer:  # a server from before the triage answer
            return sentence
        rule = f"{answer['decision_rule']} rule"
        most_probable = answer.get("most_probable_class")
        if most_probable and most_probable != answer["class"]:
            rule += f"; most probable: {CLASS_LABELS.get(most_probable, most_probable)}"
        refer = {True: "yes", False: "no"}.get(answer.get("refer"), "n/a")
        flagged = ", out of distribution (research answer)" if answer.get("out_of_distribution") else ""
        return (
            f"{sentence} ({rule}), malignant probability: {_percent(answer['malignant_probability'])}, "
            f"refer: {refer}{flagged}"
        )
    if "error" in answer:
        return f"refused: {answer['error']}"
    # TorchServe's own refusals: {"code": ..., "type": ..., "message": ...}
    return f"refused: HTTP {status}: {answer.get('message') or answer.get('type') or 'no reason given'}"


def _percent(value: float) -> str:
    return f"{round(100 * value)} percent"


def predict(
    *images: str,
    url: str | None = None,
    key: str | None = None,
    endpoint: str | None = None,
    region: str | None = None,
    model: str = MODEL_NAME,
    run_dir: str = str(DEFAULT_RUN_DIR),
    json: bool = False,
    as_json: bool = False,
    timeout: float = 60,
) -> None:  # `json`: the flag is --json
    if not images:
        sys.exit("name at least one image")
    files = []
    for name in map(Path, images):  # all checked before the first request
        if name.is_dir():
            try:
                files += image_files(name)
            except DatasetError as error:
                sys.exit(f"error: {error}")
        elif name.is_file():
            files.append(name)
        else:
            sys.exit(f"error: {name} is neither an image file nor a folder of images")
    try:
        send = (
            _sagemaker_sender(endpoint, region) if endpoint else _torchserve_sender(url, key, run_dir, model, timeout)
        )
    except ServeError as error:
        sys.exit(f"error: {error}")
    refused = 0
    for image in files:
        body, content_type = image.read_bytes(), _content_type(image)
        if as_json:
            body, content_type = _json_body(body), "application/json"
        try:
            status, answer = send(body, content_type)
        except (requests.RequestException, ServeError) as error:
            sys.exit(f"error: {image}: {error}")
        refused += status != 200
        print(_json_line(image, status, answer) if json else f"{image}: {describe(status, answer)}")
    if refused:
        sys.exit(1)


def _json_body(image: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode()}).encode()


def _json_line(image: Path, status: int, answer: dict) -> str:
    return json.dumps({"image": str(image), "status": status, "response": answer})


if __name__ == "__main__":
    fire.Fire(predict)
