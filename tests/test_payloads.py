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
