"""Build ``dist/model.tar.gz`` for the SageMaker PyTorch inference container.

    python scripts/package_sagemaker.py [--bundle_root .] [--weights models/model.pt] [--output dist/model.tar.gz]

Layout (extracted by the container to /opt/ml/model, the bundle root the Predictor reads):
``configs/``, ``models/model.pt`` (or ``model.ts``) and its sidecar ``models/model.json`` (the
trained image size, when training wrote one), ``code/inference.py`` (model_fn, input_fn,
predict_fn, output_fn), ``code/bundle/`` (importable, since the container puts code/ on sys.path)
and ``code/requirements.txt`` (installed by the container at start-up).
"""

import io
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

import fire  # noqa: E402

from bundle.predictor import bundle_files  # noqa: E402

# What the container's Python lacks; torch and Pillow come with the PyTorch image.
CONTAINER_REQUIREMENTS = "monai==1.6.1\n"


def _skip_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name else info


def package(bundle_root: str = ".", weights: str | None = None, output: str = "dist/model.tar.gz") -> None:
    try:
        bundle_root, weights, sidecar = bundle_files(bundle_root, weights)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(bundle_root / "configs", "configs", filter=_skip_caches)
        archive.add(weights, f"models/{weights.name}")
        if sidecar:
            archive.add(sidecar, f"models/{sidecar.name}")
        archive.add(REPO / "handler" / "inference.py", "code/inference.py")
        archive.add(REPO / "bundle", "code/bundle", filter=_skip_caches)
        requirements = tarfile.TarInfo("code/requirements.txt")
        requirements.size = len(CONTAINER_REQUIREMENTS)
        archive.addfile(requirements, io.BytesIO(CONTAINER_REQUIREMENTS.encode()))
    partial.replace(output)  # never leave half an archive under the final name
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): weights {weights}, sidecar {sidecar or 'none'}")


if __name__ == "__main__":
    fire.Fire(package)
