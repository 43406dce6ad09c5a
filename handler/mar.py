"""The TorchServe model archive (``.mar``): the handler, the bundle's configs, the serving modules of
the ``bundle`` package, the weights and their sidecar, and ``model-config.yaml``.

The archive is laid out like the bundle: ``configs/``, ``bundle/`` and the handler (``handler.py``, as
``skin_lesion_handler.py``) at its root,
the weights (``model.pt``, or a TorchScript ``model.ts``) and, beside them where the handler's
Predictor looks, their sidecar (``model.json``) and the out-of-distribution fit it names, plus
``model-config.yaml`` (batching, workers, timeouts, the handler's pixel limit). The ``bundle`` modules
are those serving imports (``handler.shipped``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bundle.predictor import MAX_PIXELS, bundle_files
from handler import ARCHIVED_HANDLER, MODEL_NAME
from handler.shipped import serving_files

HANDLER = Path(__file__).with_name("handler.py")


class ArchiveError(RuntimeError):
    """torch-model-archiver failed; the message holds its output."""


def write_mar(
    bundle_root: str | os.PathLike = ".",
    weights: str | os.PathLike | None = None,
    export_path: str | os.PathLike = "dist",
    version: str = "1.0",
    batch_size: int = 8,
    max_batch_delay_ms: int = 1,
    min_workers: int = 1,
    max_workers: int = 1,
    response_timeout_s: int = 60,
    max_retry_timeout_s: int = 30,
    max_pixels: int = MAX_PIXELS,
) -> Path:
    """Write ``<export_path>/skin_lesion.mar``, replacing it; return its path.

    ``weights`` defaults to ``<bundle_root>/models/model.pt``. ``max_batch_delay_ms``: how long a partial
    batch waits for more requests; a lone request pays it in full, while under load batches fill from
    the queue during the previous batch anyway (docs/SERVING.md). ``max_retry_timeout_s``: how long a worker
    may keep failing to (re)load before /ping answers 500 (TorchServe's default is 300 s).
    Raises FileNotFoundError or ValueError (bad bundle or sidecar) before anything is written, and
    ArchiveError when the archiver fails.
    """
    bundle_root, weights, sidecar, guard = bundle_files(bundle_root, weights)
    export = Path(export_path)
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skin-lesion-mar-") as staging:
        # the archiver copies a folder's contents to the archive root, so stage the folders one level down
        extra = Path(staging) / "extra"
        shutil.copytree(bundle_root / "configs", extra / "configs")
        (extra / "bundle").mkdir()
        for source in serving_files(bundle_root):
            shutil.copy(source, extra / "bundle" / source.name)
        for companion in (sidecar, guard):
            if companion:
                shutil.copy(companion, extra / companion.name)
        handler = Path(staging) / ARCHIVED_HANDLER
        shutil.copy(HANDLER, handler)
        model_config = Path(staging) / "model-config.yaml"
        model_config.write_text(
            f"minWorkers: {min_workers}\nmaxWorkers: {max_workers}\nbatchSize: {batch_size}\n"
            f"maxBatchDelay: {max_batch_delay_ms}\nresponseTimeout: {response_timeout_s}\n"
            f"maxRetryTimeoutInSec: {max_retry_timeout_s}\nhandler:\n  max_pixels: {max_pixels}\n"
        )
        command = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name",
            MODEL_NAME,
            "--version",
            version,
            "--serialized-file",
            str(weights),
            "--handler",
            str(handler),
            "--extra-files",
            str(extra),
            "--config-file",
            str(model_config),
            "--export-path",
            str(export),
            "--force",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return export / f"{MODEL_NAME}.mar"
