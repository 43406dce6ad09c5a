"""Shared fixtures: the real HAM10000 folder (optional locally, required in CI), a small synthetic set, and a
bundle with random weights with its Predictor (a test module may define its own ``bundle_root``)."""

import os
from pathlib import Path

import pytest

from bundle.predictor import Predictor
from bundle.synthetic import generate
from tests.serving import bundle_with_random_weights


@pytest.fixture(scope="session")
def ham10000_dir() -> Path:
    """The real dataset from ``HAM10000_DIR``; skipped when unset, but a failure when ``CI=true``."""
    value = os.environ.get("HAM10000_DIR")
    if not value:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("HAM10000_DIR is not set: CI must run the real-data tests")
        pytest.skip("set HAM10000_DIR to the HAM10000 folder to run the real-data tests")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"HAM10000_DIR={value} is not a directory")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """210 small synthetic images (64 x 48) in the flat HAM10000 layout; treat as read-only."""
    return generate(tmp_path_factory.mktemp("synthetic"), n_images=210, image_size=(64, 48), seed=0)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    return bundle_with_random_weights(tmp_path_factory.mktemp("bundle_root"))


@pytest.fixture(scope="module")
def predictor(bundle_root) -> Predictor:
    return Predictor(bundle_root, device="cpu")
