"""Package the trained bundle as a TorchServe model archive (``dist/skin_lesion.mar``).

    python scripts/package_mar.py [--bundle_root .] [--weights models/model.pt] [--export_path dist]
        [--batch_size 8 --max_batch_delay_ms 1 --min_workers 1 --max_workers 1 --response_timeout_s 60]

The archive holds everything the handler needs, laid out like the bundle: ``configs/`` (the
bundle's, from ``bundle_root``), the serving modules of the ``bundle`` package and ``handler.py`` (from this
repository), the weights (``model.pt``, or a TorchScript ``model.ts``) and, at the archive root beside
them where the handler's Predictor looks, their sidecar (``model.json``: the trained image size) when
training wrote one, and ``model-config.yaml`` (batching, workers, timeouts, the handler's pixel limit).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

from bundle import serving_files
from bundle.predictor import MAX_PIXELS, bundle_files
from handler import MODEL_NAME

REPO = Path(__file__).resolve().parents[1]

HANDLER = REPO / "handler" / "handler.py"


def package(bundle_root: str = ".", weights: str | None = None, export_path: str = "dist", version: str = "1.0",
            batch_size: int = 8, max_batch_delay_ms: int = 1, min_workers: int = 1, max_workers: int = 1,
            response_timeout_s: int = 60, max_retry_timeout_s: int = 30, max_pixels: int = MAX_PIXELS) -> None:
    """Write ``<export_path>/skin_lesion.mar``, replacing it.

    ``weights`` defaults to ``<bundle_root>/models/model.pt``. ``max_batch_delay_ms``: how long a partial
    batch waits for more requests; a lone request pays it in full, while under load batches fill from
    the queue during the previous batch anyway (docs/SERVING.md). ``max_retry_timeout_s``: how long a worker
    may keep failing to (re)load before /ping answers 500 (TorchServe's default is 300 s).
    """
    try:
        bundle_root, weights, sidecar = bundle_files(bundle_root, weights)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    export = Path(export_path)
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skin-lesion-mar-") as staging:
        # the archiver copies a folder's contents to the archive root, so stage the folders one level down
        extra = Path(staging) / "extra"
        shutil.copytree(bundle_root / "configs", extra / "configs")
        (extra / "bundle").mkdir()
        for source in serving_files():
            shutil.copy(source, extra / "bundle" / source.name)
        if sidecar:
            shutil.copy(sidecar, extra / sidecar.name)
        model_config = Path(staging) / "model-config.yaml"
        model_config.write_text(
            f"minWorkers: {min_workers}\nmaxWorkers: {max_workers}\nbatchSize: {batch_size}\n"
            f"maxBatchDelay: {max_batch_delay_ms}\nresponseTimeout: {response_timeout_s}\n"
            f"maxRetryTimeoutInSec: {max_retry_timeout_s}\nhandler:\n  max_pixels: {max_pixels}\n")
        command = [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", MODEL_NAME,
                   "--version", version, "--serialized-file", str(weights), "--handler", str(HANDLER),
                   "--extra-files", str(extra), "--config-file", str(model_config),
                   "--export-path", str(export), "--force"]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: torch-model-archiver failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    mar = export / f"{MODEL_NAME}.mar"
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB): weights {weights}, sidecar {sidecar or 'none'}, "
          f"batch {batch_size}, workers {min_workers}-{max_workers}")


if __name__ == "__main__":
    fire.Fire(package)
