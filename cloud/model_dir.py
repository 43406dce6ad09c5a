"""What an endpoint reads: the layout of ``model.tar.gz`` for the SageMaker PyTorch inference container.

The container extracts the archive to /opt/ml/model, the bundle root the Predictor reads:
``configs/``, ``models/model.pt`` (or ``model.ts``) and its sidecar ``models/model.json`` (the
trained image size, when training wrote one), ``code/inference.py`` (model_fn, input_fn,
predict_fn, output_fn), ``code/bundle/`` (the serving modules; importable, since the container puts code/ on sys.path)
and ``code/requirements.txt`` (installed by the container at start-up).

Written two ways from one list: as an archive (``scripts/package_sagemaker.py``) and as a folder
(the training job's SM_MODEL_DIR, which SageMaker archives into the job's own model.tar.gz).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

from bundle import serving_files
from bundle.atomic import atomic_write
from bundle.predictor import bundle_files

REPO = Path(__file__).resolve().parents[1]
# What the container's Python lacks; torch and Pillow come with the PyTorch image.
CONTAINER_REQUIREMENTS = "monai==1.6.1\n"


def model_files(bundle_root: str | os.PathLike = REPO,
                weights: str | os.PathLike | None = None) -> dict[str, Path | bytes]:
    """The model directory's files, by their path inside it: a file to copy, or the bytes to write.

    Raises FileNotFoundError or ValueError (a malformed sidecar) naming the file, before anything is written.
    """
    bundle_root, weights, sidecar = bundle_files(bundle_root, weights)
    files: dict[str, Path | bytes] = {}
    files |= _tree(bundle_root / "configs", "configs")
    files[f"models/{weights.name}"] = weights
    if sidecar:
        files[f"models/{sidecar.name}"] = sidecar
    files["code/inference.py"] = REPO / "handler" / "inference.py"
    files |= {f"code/bundle/{source.name}": source for source in serving_files()}
    files["code/requirements.txt"] = CONTAINER_REQUIREMENTS.encode()
    return files


def _tree(folder: Path, prefix: str) -> dict[str, Path]:
    return {f"{prefix}/{path.relative_to(folder).as_posix()}": path for path in sorted(folder.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


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
