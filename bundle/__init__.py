"""Python for the skin-lesion bundle: only what the JSON configs in ``configs/`` cannot say.

The configs ``$import bundle`` and call ``bundle.data...``, ``bundle.handlers...`` (MONAI's config
imports bind only the top-level name). Submodules load on first use, so that the light ones
(labels, data) don't pay for torch, MONAI and ignite.
"""

import importlib
from pathlib import Path

SUBMODULES = (
    "atomic",
    "augment",
    "cache",
    "calibration",
    "data",
    "fastpath",
    "flags",
    "handlers",
    "imageio",
    "imbalance",
    "inferers",
    "labels",
    "metrics",
    "networks",
    "plots",
    "predictor",
    "sidecar",
    "synthetic",
    "training",
)


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# What a served model runs (the Predictor, its checks and calibration): the archives ship these
# modules and no others, so training, plotting and the synthetic generator stay out of production.
SERVING_MODULES = (
    "__init__",
    "atomic",
    "calibration",
    "flags",
    "imageio",
    "inferers",
    "labels",
    "metrics",
    "payloads",
    "predictor",
    "sidecar",
)


def serving_files() -> list[Path]:
    """The source files of ``SERVING_MODULES``."""
    return [Path(__file__).with_name(f"{name}.py") for name in SERVING_MODULES]
