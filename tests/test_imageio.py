"""to_rgb turns every sound image mode into 8-bit RGB; decode_problem names what is wrong with a file; the
shared loader refuses degenerate headers cheaply, shrinks big images in 8 bits and turns photos upright."""

import io
import tempfile
import time

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import PILReader
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensityRange
from PIL import Image, ImageOps

from bundle.imageio import (
    MAX_ASPECT_RATIO,
    MIN_SIDE,
    SHRINK_MARGIN,
    EncodedImage,
    ShrinkingPILReader,
    UnusableImage,
    decode_problem,
    load_rgb,
    png_size_problem,
    shape_problem,
    shrunk_size,
    to_rgb,
)
from tests.bundle_runs import REPO
from tests.serving import png_header

ORIENTATION = 0x0112  # the EXIF tag

WIDTH, HEIGHT = 40, 20  # over bundle.imageio.MIN_SIDE, so decode_problem judges the pixels


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
    Image.new("F", (20, 20), 0.5).save(path)
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


# --- the shared loader: bounded cost, EXIF orientation (issue 9) --------------------------------------------


def _preprocessing(image_size=(64, 64)) -> Compose:
    """configs/inference.json's own preprocessing at ``image_size``."""
    parser = ConfigParser()
    parser.read_config(REPO / "configs" / "inference.json")
    parser["image_size"] = list(image_size)
    return Compose(parser.get_parsed_content("preprocessing"))


def _photo(width: int, height: int, cell: int = 25, seed: int = 0) -> Image.Image:
    """Random colours ``cell`` pixels apart, smoothly joined: no symmetry, so any flip, rotation or offset shows."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // cell, 2), max(width // cell, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _bytes(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("width", "height", "limit"),
    [
        (1, 25_000_000, f"at least {MIN_SIDE} pixels"),
        (25_000_000, 1, f"at least {MIN_SIDE} pixels"),
        (15, 100, f"at least {MIN_SIDE} pixels"),
        (2_000, 100, f"limit of {MAX_ASPECT_RATIO}:1"),
        (100, 1_001, f"limit of {MAX_ASPECT_RATIO}:1"),
    ],
)
def test_degenerate_shapes_are_refused_from_the_header_naming_the_limit(width, height, limit):
    data = png_header(width, height)  # a header and almost no pixels: decoding would fail differently
    started = time.process_time()
    problem = decode_problem(data)
    assert time.process_time() - started < 0.05
    assert limit in problem and f"{width} x {height}" in problem, problem
    with pytest.raises(RuntimeError) as error:  # MONAI's wrapping of the reader's refusal
        _preprocessing()({"image": EncodedImage(data)})
    assert isinstance(error.value.__cause__, UnusableImage) and limit in str(error.value.__cause__)


def test_shapes_at_the_limits_are_accepted():
    assert shape_problem(MIN_SIDE, MIN_SIDE * MAX_ASPECT_RATIO) is None
    assert decode_problem(_bytes(_photo(MIN_SIDE * MAX_ASPECT_RATIO, MIN_SIDE), "PNG")) is None


@pytest.mark.parametrize(("width", "height"), [(5_000, 5_000), (4_000, 3_000), (2_000, 1_500)])
def test_a_png_whose_header_claims_more_pixels_than_its_bytes_hold_is_refused_without_decoding(width, height):
    data = png_header(width, height)
    assert len(data) == 69
    started = time.process_time()
    problem = decode_problem(data)
    assert time.process_time() - started < 0.05
    assert problem.startswith(f"corrupt PNG: its header claims {width} x {height} pixels"), problem


def test_the_png_size_bound_never_refuses_a_real_png():
    """The most compressible PNGs there are, all-zero pixels at the highest compression, still pass."""
    for mode, size in (("1", (4_000, 3_000)), ("L", (4_000, 3_000)), ("RGB", (1_000, 999))):
        data = _bytes(Image.new(mode, size), "PNG", optimize=True)
        assert png_size_problem(*size, len(data)) is None
        assert decode_problem(data) is None


@pytest.mark.parametrize(
    ("size", "image_size", "decoded"),
    [
        ((4_000, 3_000), (64, 64), (128, 128)),  # 1/8 in libjpeg (500 x 375), then box-resampled to twice 64
        ((4_000, 3_000), (32, 48), (96, 64)),  # [height, width]: 1/8, then to twice each side
        ((600, 450), (64, 64), (128, 128)),  # 600 x 450 decodes whole (1/2 would leave under 4 x 64 rows)
        ((600, 450), (128, 128), (256, 450)),  # only the side at least four times its target shrinks
        ((200, 150), (64, 64), (200, 150)),  # untouched
    ],
)
def test_big_images_are_shrunk_in_8_bits_to_twice_the_target(size, image_size, decoded):
    image = load_rgb(_bytes(_photo(*size), "JPEG", quality=90), image_size)
    assert (image.mode, image.size) == ("RGB", decoded)
    assert image.size == shrunk_size(*size, image_size)


def test_a_4000_by_3000_jpeg_is_decoded_at_an_eighth_of_its_size():
    data = _bytes(_photo(4_000, 3_000), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as image:
        image.draft(None, (2 * SHRINK_MARGIN * 64, 2 * SHRINK_MARGIN * 64))  # what load_rgb asks libjpeg for
        image.load()
        expected = np.asarray(image.resize((128, 128), Image.Resampling.BOX))
    assert image.size == (500, 375)
    assert np.array_equal(np.asarray(load_rgb(data, (64, 64))), expected)


def test_images_under_four_times_the_target_decode_exactly_as_pillow_decodes_them():
    for data in (_bytes(_photo(200, 150), "JPEG"), _bytes(_photo(127, 255), "PNG")):
        with Image.open(io.BytesIO(data)) as image:
            assert np.array_equal(np.asarray(load_rgb(data, (64, 64))), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "L", "I;16", "1"])
def test_the_png_shrink_is_an_area_average_of_the_converted_image(mode):
    """Converted to 8-bit RGB first (alpha flattened at full size), then box-resampled."""
    picture = _photo(1_303, 1_001)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(picture.convert("L")).astype(np.uint16) * 257)
    elif mode in ("RGBA", "LA"):
        image = picture.convert(mode[:-1])
        image.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 1_303, dtype=np.uint8), (1_001, 1))))
    else:
        image = picture.convert(mode)
    data = _bytes(image, "PNG")
    with Image.open(io.BytesIO(data)) as decoded:
        expected = np.asarray(to_rgb(decoded).resize((128, 128), Image.Resampling.BOX))
    assert np.array_equal(np.asarray(load_rgb(data, (64, 64))), expected)


def test_the_shrink_changes_the_preprocessed_image_by_little():
    """Full-size decoding against the shrunk one, after the same area resize, for a picture as smooth at the
    network's scale as a lesion photo: within a few grey levels, under one on average."""
    plain = Compose(
        [
            LoadImage(reader=PILReader(converter=to_rgb, reverse_indexing=False), image_only=True),
            EnsureChannelFirst(),
            ScaleIntensityRange(0, 255, 0, 1, clip=True),
            Resize((64, 64), mode="area"),
        ]
    )
    for size, image_format in (((600, 450), "JPEG"), ((4_000, 3_000), "JPEG"), ((1_600, 1_200), "PNG")):
        picture = _photo(*size, cell=size[0] // 12)  # a colour change every 5 output pixels
        data = _bytes(picture, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
        full = plain(_write(data, image_format))
        shrunk = _preprocessing()({"image": EncodedImage(data)})["image"]
        assert shrunk.shape == full.shape == (3, 64, 64)
        difference = (shrunk - full).abs()
        assert difference.max().item() < 4 / 255 and difference.mean().item() < 1 / 255, (size, difference.max())


def _write(data: bytes, image_format: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=f".{image_format.lower()}", delete=False) as file:
        file.write(data)
    return file.name


def test_the_reader_refuses_without_falling_back_to_monai_default_readers(tmp_path):
    """LoadImage tries its default readers when the given one raises in read(); MONAI's plain PILReader
    would then decode the refused image, at full size and unconverted."""
    path = tmp_path / "strip.png"
    _photo(2_000, 100).save(path)
    loader = LoadImage(reader=ShrinkingPILReader((64, 64)), image_only=True)
    with pytest.raises(UnusableImage, match="too elongated"):
        loader(str(path))
    (tmp_path / "text.jpg").write_text("not a picture")
    with pytest.raises(UnusableImage, match="not an image"):
        loader(str(tmp_path / "text.jpg"))


def test_a_file_and_its_bytes_in_memory_preprocess_identically(tmp_path):
    chain = _preprocessing()
    for name, data in {
        "big.jpg": _bytes(_photo(1_000, 750), "JPEG"),
        "small.png": _bytes(_photo(90, 70), "PNG"),
    }.items():
        (tmp_path / name).write_bytes(data)
        from_file = chain({"image": str(tmp_path / name)})["image"]
        assert torch.equal(from_file, chain({"image": EncodedImage(data)})["image"])


def _tagged(image: Image.Image, orientation: int, image_format: str) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _bytes(image, image_format, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(90, 60), (900, 600)])  # under twice the target, and shrunk by 3
def test_a_png_with_an_exif_orientation_preprocesses_like_the_prerotated_png(orientation, size):
    """Upright as the camera meant it, in the one shared loader: training and serving alike."""
    stored = _photo(*size)
    tagged = _tagged(stored, orientation, "PNG")
    with Image.open(io.BytesIO(tagged)) as image:
        assert image.getexif()[ORIENTATION] == orientation
        prerotated = _bytes(ImageOps.exif_transpose(image), "PNG")
    chain = _preprocessing()
    assert torch.equal(
        chain({"image": EncodedImage(tagged)})["image"], chain({"image": EncodedImage(prerotated)})["image"]
    )
    if orientation != 1:  # not vacuous: the stored picture preprocesses differently
        assert not torch.equal(
            chain({"image": EncodedImage(_bytes(stored, "PNG"))})["image"],
            chain({"image": EncodedImage(prerotated)})["image"],
        )


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_phone_jpeg_with_an_exif_orientation_preprocesses_like_its_upright_pixels(orientation, tmp_path):
    small = _tagged(_photo(96, 64), orientation, "JPEG")  # decoded at full size: exactly equal
    with Image.open(io.BytesIO(small)) as image:
        upright_png = _bytes(ImageOps.exif_transpose(image.convert("RGB")), "PNG")
    chain = _preprocessing()
    assert torch.equal(
        chain({"image": EncodedImage(small)})["image"], chain({"image": EncodedImage(upright_png)})["image"]
    )
    # a 4000 x 3000 photo stored sideways: draft decoding sizes the stored picture for the upright target
    big = _tagged(_photo(4_000, 3_000, cell=300), orientation, "JPEG")
    with Image.open(io.BytesIO(big)) as image:
        upright_png = _bytes(ImageOps.exif_transpose(image.convert("RGB")), "PNG")
    (tmp_path / "big.png").write_bytes(upright_png)
    assert load_rgb(big, (64, 48)).size == (96, 128)  # upright [height, width] x 2, whatever the stored shape
    difference = chain({"image": EncodedImage(big)})["image"] - chain({"image": str(tmp_path / "big.png")})["image"]
    assert (
        difference.abs().max().item() < 6 / 255 and difference.abs().mean().item() < 1 / 255
    )  # a wrong turn differs by far more


def test_an_unreadable_exif_block_leaves_the_picture_as_stored():
    data = bytearray(_tagged(_photo(90, 60), 6, "JPEG"))
    start = data.index(b"Exif\0\0") + 6
    data[start : start + 8] = b"XXXXXXXX"  # not a TIFF header
    assert load_rgb(bytes(data)).size == (90, 60)
