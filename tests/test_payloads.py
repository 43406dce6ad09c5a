"""Request bodies to image bytes: every malformed body is a RequestError with a 4xx, never another exception."""

import base64
import http

import pytest

from bundle.payloads import JSON_TYPE, RequestError, image_bytes

DEPTH = 100_000


@pytest.mark.parametrize(
    "body",
    [
        "[" * DEPTH + "]" * DEPTH,
        '{"image": ' + "[" * DEPTH + "]" * DEPTH + "}",
        '{"image": ' + '{"a": ' * DEPTH + "1" + "}" * DEPTH + "}",
        "[" * DEPTH,  # unterminated as well
    ],
)
@pytest.mark.parametrize("as_bytes", [True, False])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(body, as_bytes):
    with pytest.raises(RequestError) as error:
        image_bytes(body.encode() if as_bytes else body, JSON_TYPE)
    assert error.value.status == http.HTTPStatus.BAD_REQUEST
    assert "JSON" in error.value.error


def test_a_well_formed_json_body_still_gives_its_image():
    assert image_bytes(f'{{"image": "{base64.b64encode(b"bytes").decode()}"}}'.encode(), JSON_TYPE) == b"bytes"


@pytest.mark.parametrize(
    "content_type",
    ["image/jpg", "image/pjpeg", "Image/JPEG", "image/gif", "binary/octet-stream", "application/x-image"],
)
def test_raw_bytes_under_any_image_or_binary_type_are_handed_on_for_the_bytes_to_decide(content_type):
    assert image_bytes(b"\xff\xd8\xff bytes", content_type) == b"\xff\xd8\xff bytes"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "video/mp4", "multipart/mixed"])
def test_raw_bytes_under_another_type_are_a_415_that_says_what_to_send(content_type):
    with pytest.raises(RequestError) as error:
        image_bytes(b"bytes", content_type)
    assert (
        error.value.status == http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE and "send JPEG or PNG bytes" in error.value.error
    )


def test_a_data_uri_gives_its_image_as_a_browser_writes_it():
    encoded = base64.b64encode(b"bytes").decode()
    assert image_bytes(f'{{"image": "data:image/jpeg;base64,{encoded}"}}', JSON_TYPE) == b"bytes"
    with pytest.raises(RequestError, match="not valid base64"):  # a data URI that is not base64 is not decoded
        image_bytes(f'{{"image": "data:image/jpeg,{encoded}"}}', JSON_TYPE)
