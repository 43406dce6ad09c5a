"""Python for the skin-lesion bundle: only what the JSON configs in ``configs/`` cannot say.

The configs ``$import bundle`` and call ``bundle.data...``, ``bundle.handlers...`` (MONAI's config
imports bind only the top-level name). Submodules load on first use, so that the light ones
(labels, data) don't pay for torch, MONAI and ignite. What the archives ship of it is derived from
what serving imports (``handler.shipped``).
"""

import importlib
from pathlib import Path


def __getattr__(name: str):
    if (Path(__file__).parent / f"{name}.py").is_file():
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
