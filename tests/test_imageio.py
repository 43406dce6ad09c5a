"""to_rgb turns every sound image mode into 8-bit RGB; decode_problem names what is wrong with a file."""

import numpy as np
import pytest
from monai.data import PILReader
from monai.transforms import EnsureChannelFirst, LoadImage
from PIL import Image

from bundle.imageio import decode_problem, to_rgb

WIDTH, HEIGHT = 20, 10


def _sample(mode: str) -> Image.Image:
    """A WIDTH x HEIGHT image of ``mode`` with a gradient, so a transposed or flattened result shows."""
    gradient = np.tile(np.linspace(0, 255, WIDTH, dtype=np.uint8), (HEIGHT, 1))
    rgb = Image.fromarray(np.stack([gradient, gradient[::-1], np.full_like(gradient, 90)], axis=-1))
    return rgb.convert(mode)


def _sixteen_bit_png(tmp_path, values) -> Image.Image:
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.array([values], dtype=np.uint16)).save(path)
    return Image.open(path)


def test_rgb_is_returned_as_is():
    image = _sample("RGB")
    assert to_rgb(image) is image


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "CMYK", "YCbCr", "1"])
def test_sound_modes_become_rgb_of_the_same_size(mode):
    converted = to_rgb(_sample(mode))
    assert converted.mode == "RGB"
    assert converted.size == (WIDTH, HEIGHT)


def test_grayscale_keeps_its_value_in_every_channel():
    assert to_rgb(Image.new("L", (2, 2), 100)).getpixel((0, 0)) == (100, 100, 100)


def test_bilevel_becomes_black_and_white():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(image))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 0), (200, 10, 10, 255))
    assert np.asarray(to_rgb(image))[0].tolist() == [[255, 255, 255], [200, 10, 10]]


def test_palette_transparency_is_composited_onto_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 200, 10, 10])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    assert np.asarray(to_rgb(image))[0].tolist() == [[255, 255, 255], [200, 10, 10]]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    _sample("CMYK").save(path)
    with Image.open(path) as image:
        assert image.mode == "CMYK"
        assert to_rgb(image).mode == "RGB"


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    image = _sixteen_bit_png(tmp_path, [65535, 32768, 257, 0])
    assert image.mode.startswith("I")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [255, 128, 1, 0]


def test_thirty_two_bit_integer_with_sixteen_bit_values_is_scaled():
    image = Image.fromarray(np.array([[65535, 32768]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [255, 128]


def test_integer_values_beyond_sixteen_bits_are_refused():
    with pytest.raises(ValueError, match="exceed 16 bits"):
        to_rgb(Image.fromarray(np.array([[70000]], dtype=np.int32)))


def test_float_images_are_refused():
    with pytest.raises(ValueError, match="unsupported image mode 'F'"):
        to_rgb(Image.new("F", (2, 2), 0.5))


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("L", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("CMYK", ".jpg"), ("RGB", ".jpg")]
    + [("I;16", ".png")],
)
def test_monai_loads_three_channels_through_the_converter(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    if mode == "I;16":
        Image.fromarray(np.full((HEIGHT, WIDTH), 40000, dtype=np.uint16)).save(path)
    else:
        _sample(mode).save(path)
    loader = LoadImage(reader=PILReader(converter=to_rgb), image_only=True)
    tensor = EnsureChannelFirst()(loader(str(path)))
    assert tuple(tensor.shape) == (3, WIDTH, HEIGHT)
    assert tensor.dtype.is_floating_point


def test_decode_problem_passes_a_sound_image(tmp_path):
    path = tmp_path / "fine.jpg"
    _sample("RGB").save(path)
    assert decode_problem(path) is None


def test_decode_problem_reports_an_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert decode_problem(path) == "file is empty"


def test_decode_problem_reports_a_missing_file(tmp_path):
    assert decode_problem(tmp_path / "absent.jpg") == "file not found"


def test_decode_problem_reports_a_truncated_jpeg(tmp_path):
    path = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:1500])
    assert decode_problem(path).startswith("cannot decode: image file is truncated")


def test_decode_problem_reports_a_non_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture")
    assert decode_problem(path) == "not an image file Pillow can identify"


def test_decode_problem_reports_an_unsupported_mode(tmp_path):
    path = tmp_path / "float.tif"
    Image.new("F", (4, 4), 0.5).save(path)
    assert decode_problem(path) == "unsupported image mode 'F'"


def test_decode_problem_reports_a_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: over the limit, under twice it
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_problem(path).startswith("image too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: Pillow raises instead
    assert decode_problem(path).startswith("image too large")


def test_monai_without_reverse_indexing_keeps_numpy_row_order(tmp_path):
    path = tmp_path / "image.png"
    _sample("L").save(path)
    loader = LoadImage(reader=PILReader(converter=to_rgb, reverse_indexing=False), image_only=True)
    assert tuple(EnsureChannelFirst()(loader(str(path))).shape) == (3, HEIGHT, WIDTH)
