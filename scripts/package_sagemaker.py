"""Build ``dist/model.tar.gz`` for the SageMaker PyTorch inference container.

    python scripts/package_sagemaker.py [--bundle_root .] [--weights models/model.pt] [--output dist/model.tar.gz]

The layout (``configs/``, ``models/``, ``code/inference.py``, ``code/bundle/``, ``code/requirements.txt``)
is described in ``cloud/model_dir.py``; a SageMaker training job leaves the same one in SM_MODEL_DIR.
"""

import sys

import fire

from cloud.model_dir import model_files, write_archive


def package(bundle_root: str = ".", weights: str | None = None, output: str = "dist/model.tar.gz") -> None:
    try:
        files = model_files(bundle_root, weights)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    output = write_archive(files, output)
    models = ", ".join(f"{name} (from {files[name]})" for name in files if name.startswith("models/"))
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): {models}")


if __name__ == "__main__":
    fire.Fire(package)
