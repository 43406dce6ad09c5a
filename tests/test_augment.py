"""The batched device augmentation does what the per-sample MONAI chain in train.json does."""

import math

import pytest
import torch
from monai.transforms import Flip, Rotate, Zoom

from bundle.augment import BatchAugmentation

N = 20_000  # parameter draws for the statistical checks: a share's standard error is ~0.0035


@pytest.fixture(scope="module")
def params():
    return BatchAugmentation(rotate_degrees=15, rotate_prob=0.5, flip_prob=0.5, zoom_range=(0.9, 1.1),
                             zoom_prob=0.5, seed=0).sample_parameters(N)


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


@pytest.mark.parametrize("kwargs", [{"rotate_prob": 1.5}, {"flip_prob": -0.1}, {"zoom_range": (1.1, 0.9)}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="augmentation"):
        BatchAugmentation(**kwargs)
