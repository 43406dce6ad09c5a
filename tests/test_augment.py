"""The batched device augmentation does what the per-sample MONAI chain in train.json does."""

import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Flip, Rand2DElasticd, RandCoarseDropoutd, Rotate, Zoom

from bundle.augment import LUMA, BatchAugmentation, RandColourJitterd, colour_jitter

REPO = Path(__file__).resolve().parents[1]
N = 20_000  # parameter draws for the statistical checks: a share's standard error is ~0.0035


@pytest.fixture(scope="module")
def params():
    return BatchAugmentation(
        rotate_degrees=15, rotate_prob=0.5, flip_prob=0.5, zoom_range=(0.9, 1.1), zoom_prob=0.5, seed=0
    ).sample_parameters(N)


def _smooth_image(h: int = 40, w: int = 56) -> torch.Tensor:
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1))
    return torch.nn.functional.avg_pool2d(image[None], 5, 1, 2)[0]  # interpolation-friendly


def _warp(image: torch.Tensor, angle: float = 0.0, zoom: float = 1.0, flip: tuple[bool, bool] = (False, False)):
    augmentation = BatchAugmentation()
    params = {"angle": torch.tensor([angle]), "zoom": torch.tensor([zoom]), "flip": torch.tensor([flip])}
    return augmentation.warp(image[None], augmentation.matrices(params, image.shape[1:]))[0]


def test_each_transform_applies_with_its_probability(params):
    assert (params["angle"] != 0).float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert (params["zoom"] != 1).float().mean().item() == pytest.approx(0.5, abs=0.015)
    flip_share = params["flip"].float().mean(0)
    assert flip_share.tolist() == pytest.approx([0.5, 0.5], abs=0.015)


def test_parameters_stay_in_the_chains_ranges(params):
    angles = params["angle"][params["angle"] != 0]
    assert angles.abs().max().item() <= math.radians(15)
    # uniform over ±15°: mean ~0, both ends reached, a quarter of the mass beyond ±7.5°
    assert angles.mean().item() == pytest.approx(0.0, abs=0.01)
    assert angles.min().item() < math.radians(-14.5) and angles.max().item() > math.radians(14.5)
    assert (angles.abs() > math.radians(7.5)).float().mean().item() == pytest.approx(0.5, abs=0.02)
    zooms = params["zoom"][params["zoom"] != 1]
    assert zooms.min().item() >= 0.9 and zooms.max().item() <= 1.1
    assert zooms.mean().item() == pytest.approx(1.0, abs=0.003)


def test_decisions_are_independent_of_each_other(params):
    decisions = torch.stack([params["angle"] != 0, params["zoom"] != 1, params["flip"][:, 0], params["flip"][:, 1]], 1)
    correlation = torch.corrcoef(decisions.float().T)
    off_diagonal = correlation[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 0.03


def test_every_image_in_a_batch_draws_its_own_parameters():
    batch = _smooth_image()[None].repeat(64, 1, 1, 1)
    out = BatchAugmentation(rotate_prob=1.0, zoom_prob=1.0, seed=0)(batch)
    flat = out.reshape(64, -1)
    distinct = torch.cdist(flat, flat) + torch.eye(64) * 1e9
    assert distinct.min().item() > 1e-3, "two images of the batch got the same augmentation"


def test_same_seed_same_stream_other_seed_other_stream():
    batch = _smooth_image()[None].repeat(16, 1, 1, 1)
    first, second = BatchAugmentation(seed=7), BatchAugmentation(seed=7)
    for _ in range(3):  # the whole stream, not just the first batch
        assert torch.equal(first(batch), second(batch))
    assert not torch.equal(BatchAugmentation(seed=7)(batch), BatchAugmentation(seed=8)(batch))


def test_rotation_is_monais_rotate():
    image, angle = _smooth_image(), math.radians(12)
    expected = Rotate(angle, mode="bilinear", padding_mode="border")(image)
    assert (_warp(image, angle=angle) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("axis", [0, 1])
def test_flips_are_monais_flip(axis):
    image = _smooth_image()
    flip = (axis == 0, axis == 1)
    assert (_warp(image, flip=flip) - Flip(spatial_axis=axis)(image)).abs().max().item() < 1e-5


def test_rotation_then_flip_compose_in_the_chains_order():
    image, angle = _smooth_image(), math.radians(-10)
    expected = Flip(spatial_axis=0)(Rotate(angle, mode="bilinear", padding_mode="border")(image))
    assert (_warp(image, angle=angle, flip=(True, False)) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("zoom", [0.9, 1.1])
def test_zoom_matches_monais_zoom(zoom):
    """MONAI resizes then crops or pads, so the grids differ by a fraction of a pixel: compare the
    interior with the opposite zoom as the yardstick of a wrong answer."""
    image = _smooth_image()
    expected = Zoom(zoom, mode="bilinear", padding_mode="edge", keep_size=True)(image)[:, 4:-4, 4:-4]
    right = (_warp(image, zoom=zoom)[:, 4:-4, 4:-4] - expected).abs().mean().item()
    wrong = (_warp(image, zoom=1 / zoom)[:, 4:-4, 4:-4] - expected).abs().mean().item()
    assert right < 0.015 and right < wrong / 3


def test_no_augmentation_is_the_identity():
    image = _smooth_image()
    assert (_warp(image) - image).abs().max().item() < 1e-5
    out = BatchAugmentation(rotate_prob=0, flip_prob=0, zoom_prob=0)(image[None].repeat(4, 1, 1, 1))
    assert (out - image).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rotate_prob": 1.5},
        {"flip_prob": -0.1},
        {"zoom_range": (1.1, 0.9)},
        {"cutout_size": 1.0},
        {"cutout_prob": 2},
        {"elastic_magnitude": -1},
        {"elastic_spacing": 0},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="augmentation"):
        BatchAugmentation(**kwargs)


def test_colour_jitter_factors_act_as_named():
    image = _smooth_image()[None]
    grey = (image * torch.tensor(LUMA).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    one = torch.ones(1)
    assert torch.allclose(colour_jitter(image.clone(), one, one, one), image, atol=1e-6), "factors 1: unchanged"
    darker = colour_jitter(image.clone(), torch.tensor([0.8]), one, one)
    assert torch.allclose(darker, image * 0.8, atol=1e-6)
    flat = colour_jitter(image.clone(), one, torch.zeros(1), one)
    assert flat.std(dim=(2, 3)).max().item() < 1e-6, "contrast 0: every pixel at the mean grey"
    desaturated = colour_jitter(image.clone(), one, one, torch.zeros(1))
    assert torch.allclose(desaturated, grey.expand_as(image), atol=1e-6), "saturation 0: the image's own grey"
    bright = colour_jitter(image.clone(), torch.tensor([5.0]), one, one)
    assert bright.min().item() >= 0 and bright.max().item() == 1.0, "clipped to the preprocessing's range"


def test_batched_colour_jitter_draws_each_images_factors_in_range():
    augmentation = BatchAugmentation(brightness=0.2, contrast=0.3, saturation=0.1, colour_prob=0.8, seed=0)
    colour = augmentation.sample_parameters(N)["colour"]
    jittered = (colour != 1).any(1)
    assert jittered.float().mean().item() == pytest.approx(0.8, abs=0.015)
    for column, strength in enumerate((0.2, 0.3, 0.1)):
        values = colour[jittered, column]
        assert values.min().item() >= 1 - strength and values.max().item() <= 1 + strength
        assert values.mean().item() == pytest.approx(1.0, abs=0.005)


def test_colour_jitter_and_cutout_leave_the_earlier_streams_of_a_seed_unchanged():
    plain = BatchAugmentation(seed=3).sample_parameters(100)
    coloured = BatchAugmentation(brightness=0.2, seed=3).sample_parameters(100)
    holed = BatchAugmentation(brightness=0.2, cutout_size=0.25, seed=3).sample_parameters(100)
    for key in ("angle", "zoom", "flip"):
        assert torch.equal(plain[key], coloured[key]) and torch.equal(plain[key], holed[key])
    assert torch.equal(coloured["colour"], holed["colour"])


def test_the_chains_colour_jitter_uses_the_same_function_and_ranges():
    transform = RandColourJitterd("image", brightness=0.2, contrast=0.2, saturation=0.2, prob=1.0)
    transform.set_random_state(0)
    image = _smooth_image()
    for _ in range(20):
        out = transform({"image": image.clone()})["image"]
        assert all(0.8 <= f <= 1.2 for f in transform.factors)
        assert torch.allclose(
            out, colour_jitter(image[None].clone(), *map(torch.tensor, transform.factors))[0], atol=1e-6
        )
    never = RandColourJitterd("image", brightness=0.2, prob=0.0)
    assert torch.equal(never({"image": image})["image"], image)


def _holes(images: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Each image's black rectangle as (first row, first column, rows, columns), None when it has none;
    asserts that the black pixels of an image form one filled rectangle."""
    found = []
    for image in images:
        black = (image == 0).all(0)
        if not black.any():
            found.append(None)
            continue
        rows, cols = black.any(1).nonzero()[:, 0], black.any(0).nonzero()[:, 0]
        box = (rows[0].item(), cols[0].item(), len(rows), len(cols))
        assert black.sum().item() == box[2] * box[3], "one filled rectangle"
        found.append(box)
    return found


def _chain_transform(kind: type, image_size: list[int], **augment):
    """The ``kind`` of transform train_chain.json builds for these settings (the configs' defaults otherwise)."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json"), str(REPO / "configs" / "train_chain.json")])
    parser.update({"image_size": image_size, **{f"augment#{key}": value for key, value in augment.items()}})
    (transform,) = [t for t in parser.get_parsed_content("train#augmentation") if isinstance(t, kind)]
    return transform


def test_cutout_holes_one_black_rectangle_placed_where_it_fits_like_the_chains_coarse_dropout():
    """Both paths: a quarter of each side (5x7 px on 20x28), half the images, first row uniform over
    0..15 and first column over 0..21, the hole always whole."""
    n, grey = 4000, torch.full((3, 20, 28), 0.5)
    batched = BatchAugmentation(rotate_prob=0, flip_prob=0, zoom_prob=0, cutout_size=0.25, cutout_prob=0.5, seed=0)
    batched_holes = _holes(batched(grey[None].repeat(n, 1, 1, 1)))
    chain = _chain_transform(RandCoarseDropoutd, [20, 28], cutout_size=0.25, cutout_prob=0.5)
    chain.set_random_state(0)
    chain_holes = _holes(torch.stack([torch.as_tensor(chain({"image": grey.clone()})["image"]) for _ in range(n)]))
    for holes in (batched_holes, chain_holes):
        placed = [h for h in holes if h is not None]
        assert len(placed) / n == pytest.approx(0.5, abs=0.03)
        assert {h[2:] for h in placed} == {(5, 7)}
        rows, cols = torch.tensor([h[0] for h in placed]).float(), torch.tensor([h[1] for h in placed]).float()
        assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (0, 15, 0, 21)
        assert rows.mean().item() == pytest.approx(7.5, abs=0.3) and cols.mean().item() == pytest.approx(10.5, abs=0.4)


def test_no_cutout_or_elastic_deformation_by_default_in_either_path():
    image = _smooth_image()[None].repeat(64, 1, 1, 1)
    assert _holes(BatchAugmentation(rotate_prob=0, flip_prob=0, zoom_prob=0)(image)) == [None] * 64
    for kind in (RandCoarseDropoutd, Rand2DElasticd):
        chain = _chain_transform(kind, [40, 56])
        assert all(torch.equal(torch.as_tensor(chain({"image": im})["image"]), im) for im in image)


def _displacement(warped_ramps: torch.Tensor) -> torch.Tensor:
    """Pixel displacements read off warped coordinate ramps (channel 0 = row index, 1 = column index),
    inside a margin where the border padding cannot clip them."""
    n, _, h, w = warped_ramps.shape
    rows = torch.arange(h, dtype=torch.float32).reshape(1, h, 1)
    cols = torch.arange(w, dtype=torch.float32).reshape(1, 1, w)
    d = torch.stack([warped_ramps[:, 0] - rows, warped_ramps[:, 1] - cols], 1)
    return d[:, :, 8:-8, 8:-8]


def test_elastic_deformation_displaces_like_the_chains_rand2delastic():
    """Both paths on coordinate ramps (a bilinear warp reads a ramp exactly): the same size of
    displacement (RMS over images and pixels) and the same smoothness (RMS change between neighbours),
    and half the images untouched at elastic_prob 0.5."""
    h, w, n = 48, 48, 300
    ramps = torch.stack(
        [torch.arange(h).float()[:, None].expand(h, w), torch.arange(w).float()[None].expand(h, w), torch.zeros(h, w)]
    )
    settings = {"elastic_magnitude": 0.05, "elastic_spacing": 0.25, "elastic_prob": 0.5}
    batched = BatchAugmentation(rotate_prob=0, flip_prob=0, zoom_prob=0, seed=0, **settings)
    chain = _chain_transform(Rand2DElasticd, [h, w], **settings)
    chain.set_random_state(0)
    found = {
        "batched": _displacement(batched(ramps[None].repeat(n, 1, 1, 1))),
        "chain": _displacement(torch.stack([torch.as_tensor(chain({"image": ramps})["image"]) for _ in range(n)])),
    }
    # MONAI upsamples the control points' coordinates, not only their offsets, and bicubic interpolation
    # of those coordinates adds a fixed ripple (up to 0.58 px here) to every deformed image: left out
    chain.rand_2d_elastic.deform_grid.magnitude = (0.0, 0.0)
    chain.set_random_state(0)
    ripple = _displacement(torch.stack([torch.as_tensor(chain({"image": ramps})["image"]) for _ in range(8)]))
    ripple = ripple[ripple.abs().amax((1, 2, 3)) > 1e-3][0]
    stats = {}
    for path, d in found.items():
        moved = d.abs().amax((1, 2, 3)) > 1e-3
        assert moved.float().mean().item() == pytest.approx(0.5, abs=0.1), path
        d = d[moved] - (ripple if path == "chain" else 0)
        stats[path] = (d.pow(2).mean().sqrt().item(), (d[..., 1:] - d[..., :-1]).pow(2).mean().sqrt().item())
    # a 48-px side at 0.05: displacement standard deviations up to 2.4 px; about 1 px RMS in both
    assert 0.5 < stats["batched"][0] < 2.0
    for batched_stat, chain_stat in zip(stats["batched"], stats["chain"], strict=True):
        assert batched_stat == pytest.approx(chain_stat, rel=0.15), stats
