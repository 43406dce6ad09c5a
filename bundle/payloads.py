"""Image bytes out of HTTP request bodies, and the status code of each refusal.

Shared by the TorchServe handler and the SageMaker adapter, so that both accept the same inputs
and refuse bad ones with the same codes: raw JPEG/PNG bytes, a multipart form's file field, or
JSON ``{"image": "<base64>"}``.
"""

from __future__ import annotations

import base64
import http
import json

from bundle.predictor import Rejection, RejectionKind

# Raw bytes under any image/* type (clients send image/jpg, image/pjpeg) or a generic binary one (S3 labels uploads
# binary/octet-stream); an empty type too: `curl -T image.jpg` sends none. The bytes themselves then decide: a
# format other than JPEG or PNG is refused by name (bundle.predictor).
BINARY_TYPES = frozenset({"application/x-image", "application/octet-stream", "binary/octet-stream", ""})
JSON_TYPE = "application/json"
USAGE = (
    "send JPEG or PNG bytes (Content-Type image/jpeg or image/png), multipart/form-data with the image "
    'in a file field named "data", or application/json {"image": "<base64>"}'
)

REJECTION_STATUS = {
    RejectionKind.TOO_LARGE: http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    RejectionKind.UNSUPPORTED_FORMAT: http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    RejectionKind.INTERNAL: http.HTTPStatus.INTERNAL_SERVER_ERROR,
}


class RequestError(Exception):
    """A request that carries no usable image bytes: wrong content type, bad JSON or bad base64."""

    def __init__(self, status: http.HTTPStatus, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


def rejection_status(rejection: Rejection) -> http.HTTPStatus:
    """413 for images over the pixel limit, 415 for formats other than JPEG/PNG, 500 for our own failures, else 400."""
    return REJECTION_STATUS.get(rejection.kind, http.HTTPStatus.BAD_REQUEST)


def image_bytes(value: bytes | bytearray | str | dict | list, content_type: str) -> bytes:
    """Image bytes from one request body (TorchServe hands over JSON it could parse already parsed)."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == JSON_TYPE:
        return _image_from_json(value)
    raw = media_type.startswith("image/") or media_type in BINARY_TYPES
    if not raw or not isinstance(value, (bytes, bytearray)):
        raise RequestError(http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported content type {media_type!r}: {USAGE}")
    return bytes(value)


def _image_from_json(value: bytes | bytearray | str | dict | list | int | float | None) -> bytes:
    if isinstance(value, (bytes, bytearray, str)):
        try:
            value = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(http.HTTPStatus.BAD_REQUEST, f"invalid JSON: {error}") from None
        except RecursionError:  # the decoder recurses once per level of nesting: [[[[...]]]] 100,000 deep
            raise RequestError(
                http.HTTPStatus.BAD_REQUEST,
                'invalid JSON: nested too deeply; expected {"image": "<base64 of a JPEG or PNG>"}',
            ) from None
    if not isinstance(value, dict) or not isinstance(value.get("image"), str):
        raise RequestError(http.HTTPStatus.BAD_REQUEST, 'expected a JSON object {"image": "<base64 of a JPEG or PNG>"}')
    return _from_base64(value["image"], 'field "image"')


def image_from_v2_input(tensor: dict) -> bytes:
    """Image bytes from one input of an Open Inference Protocol (KServe v2) request, as TorchServe's kservev2
    envelope hands it over: ``{"name", "datatype": "BYTES", "shape", "data": "<base64>"}`` (the envelope keeps
    the first element of a BYTES input's data, so one input carries one image)."""
    name = tensor.get("name")
    if tensor.get("datatype") != "BYTES" or not isinstance(tensor.get("data"), str):
        raise RequestError(
            http.HTTPStatus.BAD_REQUEST,
            f'input {name!r}: expected datatype BYTES with data ["<base64 of a JPEG or PNG>"], one image per input',
        )
    return _from_base64(tensor["data"], f"input {name!r}")


def _from_base64(text: str, what: str) -> bytes:
    # a data URI's header goes (a browser's FileReader.readAsDataURL and canvas.toDataURL write one)
    header, comma, payload = text.partition(",")
    if comma and header.startswith("data:") and header.endswith(";base64"):
        text = payload
    try:  # line breaks are allowed: the `base64` tool wraps its output
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError as error:  # binascii.Error, or non-ASCII characters
        raise RequestError(http.HTTPStatus.BAD_REQUEST, f"{what} is not valid base64: {error}") from None
