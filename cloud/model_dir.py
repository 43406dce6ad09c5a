"""What an endpoint reads: the layout of ``model.tar.gz`` for the SageMaker PyTorch inference container.

The container extracts the archive to /opt/ml/model, the bundle root the Predictor reads:
``configs/``, ``models/model.pt`` (or ``model.ts``), its sidecar ``models/model.json`` (the
trained image size, when training wrote one) and the out-of-distribution fit the sidecar names,
whatever the weights were called where they came from,
``code/bundle/`` (the serving modules; importable, since the container puts code/ on sys.path) and
``code/requirements.txt`` (installed by the container at start-up).

Which code answers requests: the container's toolkit starts TorchServe over /opt/ml/model, and
TorchServe takes the handler that ``MAR-INF/MANIFEST.json`` names over the toolkit's own. That is
``code/skin_lesion_handler.py``, the TorchServe handler of ``handler/handler.py``, which answers every
request of a batch on its own (its own content type, its own status). The toolkit's handler cannot:
it applies the first request's content type to the whole batch and, when one item raises, answers
the whole batch with one error, which TorchServe turns into 503 for every request of the batch.
``code/inference.py`` (model_fn, input_fn, predict_fn, output_fn) stays for a container that ignores
the manifest; it is correct there only with ``SAGEMAKER_TS_BATCH_SIZE=1``.

Written two ways from one list: as an archive (``scripts/package_sagemaker.py``) and as a folder
(the training job's SM_MODEL_DIR, which SageMaker archives into the job's own model.tar.gz).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from bundle.atomic import atomic_write
from bundle.predictor import bundle_files
from handler import ARCHIVED_HANDLER
from handler.shipped import serving_files

REPO = Path(__file__).resolve().parents[1]
# What the container's Python lacks (torch and Pillow come with the PyTorch image), and why that MONAI: in the file.
CONTAINER_REQUIREMENTS = (Path(__file__).with_name("inference_requirements.txt")).read_text()
# The toolkit registers the model as "model", version "1.0"; its SAGEMAKER_TS_* settings (batch size,
# workers, timeouts) are keyed by that name and version, so the manifest must say "1.0" too. No
# configFile: a model-config.yaml's batch size would override SAGEMAKER_TS_BATCH_SIZE.
MANIFEST = {
    "runtime": "python",
    "archiverVersion": "0.12.0",
    "model": {"modelName": "model", "modelVersion": "1.0", "handler": ARCHIVED_HANDLER},
}


def model_files(
    bundle_root: str | os.PathLike = REPO, weights: str | os.PathLike | None = None
) -> dict[str, Path | bytes]:
    """The model directory's files, by their path inside it: a file to copy, or the bytes to write.

    Raises FileNotFoundError or ValueError (a malformed sidecar) naming the file, before anything is written.
    """
    bundle_root, weights, sidecar, guard = bundle_files(bundle_root, weights)
    # Stored under the names model_fn and the handler load, whatever they were called (e.g. --weights
    # best.pt); the Predictor reads any suffix but .ts as a state_dict.
    stored = "models/model.ts" if weights.suffix == ".ts" else "models/model.pt"
    files: dict[str, Path | bytes] = {}
    files |= _tree(bundle_root / "configs", "configs")
    files[stored] = weights
    if sidecar:
        files["models/model.json"] = sidecar
    if guard:  # under the name the sidecar gives it
        files[f"models/{guard.name}"] = guard
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["model"]["serializedFile"] = stored
    files["MAR-INF/MANIFEST.json"] = json.dumps(manifest, indent=1).encode()
    files[f"code/{ARCHIVED_HANDLER}"] = REPO / "handler" / "handler.py"
    files["code/inference.py"] = REPO / "handler" / "inference.py"
    files |= {f"code/bundle/{source.name}": source for source in serving_files(bundle_root)}
    files["code/requirements.txt"] = CONTAINER_REQUIREMENTS.encode()
    return files


def _tree(folder: Path, prefix: str) -> dict[str, Path]:
    return {
        f"{prefix}/{path.relative_to(folder).as_posix()}": path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def write_archive(files: dict[str, Path | bytes], output: str | os.PathLike) -> Path:
    """Write ``files`` as a gzipped tar; it appears under ``output`` only once complete."""

    def write(partial: Path) -> None:
        with tarfile.open(partial, "w:gz") as archive:
            for name, source in files.items():
                if isinstance(source, bytes):
                    info = tarfile.TarInfo(name)
                    info.size = len(source)
                    archive.addfile(info, io.BytesIO(source))
                else:
                    archive.add(source, name)

    output = Path(output)
    atomic_write(output, write)
    return output


def write_directory(files: dict[str, Path | bytes], directory: str | os.PathLike) -> Path:
    """Write ``files`` into ``directory`` (created if need be), as the archive would extract."""
    directory = Path(directory)
    for name, source in files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
    return directory
