"""SageMaker PyTorch inference container adapter: the toolkit's four functions over the bundle's Predictor.

The container extracts model.tar.gz (built by ``scripts/package_sagemaker.py``) to /opt/ml/model; the
bundle package sits beside this file in ``code/``. One request carries one image: raw JPEG/PNG bytes
or JSON ``{"image": "<base64>"}``.

The archive's ``MAR-INF/MANIFEST.json`` makes the container's TorchServe answer requests with
``code/skin_lesion_handler.py`` instead of the toolkit's handler, which would call these functions:
the toolkit gives every request of a batch the first one's content type and answers the whole batch
with one error when one item raises (TorchServe then says 503 to all of them), and it appends a
Python traceback to every error body. These four functions serve a container that ignores the
manifest, and are correct there only with ``SAGEMAKER_TS_BATCH_SIZE=1`` (cloud/model_dir.py).
"""

from __future__ import annotations

import http
import json
from pathlib import Path

from bundle.payloads import JSON_TYPE, RequestError, image_bytes, rejection_status
from bundle.predictor import Prediction, Predictor, Rejection, worker_device

try:  # inside the container the toolkit turns this error into the response's status code
    from sagemaker_inference.errors import GenericInferenceToolkitError as ToolkitError
except ImportError:  # elsewhere (tests, local runs) an exception with the same fields

    class ToolkitError(Exception):
        def __init__(self, status_code: int, message: str | None = None, phrase: str | None = None) -> None:
            super().__init__(message)
            self.status_code, self.message, self.phrase = status_code, message, phrase


def _refuse(status: http.HTTPStatus, error: str) -> ToolkitError:
    return ToolkitError(status.value, json.dumps({"error": error}), status.phrase)


def model_fn(model_dir: str, context=None) -> Predictor:
    """With the toolkit's context (it passes one to a model_fn that takes it), each worker on its own GPU."""
    models = Path(model_dir) / "models"
    weights = models / "model.pt" if (models / "model.pt").is_file() else models / "model.ts"
    device = None if context is None else worker_device(context.system_properties.get("gpu_id"))
    return Predictor(model_dir, weights, device)


def input_fn(request_body: bytes | str, request_content_type: str) -> list[bytes]:
    try:
        return [image_bytes(request_body, request_content_type or "")]
    except RequestError as error:
        raise _refuse(error.status, error.error) from None


def predict_fn(images: list[bytes], predictor: Predictor) -> list[Prediction | Rejection]:
    return predictor.predict(images)


def output_fn(results: list[Prediction | Rejection], accept: str) -> tuple[str, str]:
    # an Accept header lists media ranges, with parameters and in any case: JSON must match one of them
    ranges = {item.split(";")[0].strip().lower() for item in (accept or "").split(",")} - {""}
    if ranges and not ranges & {JSON_TYPE, "application/*", "*/*"}:
        raise _refuse(http.HTTPStatus.NOT_ACCEPTABLE, f"the response is {JSON_TYPE}, not any of {accept}")
    (result,) = results
    if isinstance(result, Rejection):
        raise _refuse(rejection_status(result), result.error)
    return json.dumps(result.to_json()), JSON_TYPE
