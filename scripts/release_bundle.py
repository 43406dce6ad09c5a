"""Write the trained bundle as a MONAI model-zoo release: ``dist/<name>_v<version>.zip``.

    python scripts/release_bundle.py [--bundle_root DIR] [--weights DIR/models/model.pt] [--output_dir dist]
        [--files_url https://github.com/OWNER/REPO/releases/download/v0.3.0]

The zip holds one folder, ``<name>/`` (``monai.bundle download`` extracts it under ``--bundle_dir``), laid out
as a model-zoo bundle that runs from its own folder with only MONAI, torch and the packages metadata.json
declares installed:

- ``configs/``: the bundle's configs, with ``inference.json``'s ``image_size`` and metadata.json's input
  ``spatial_shape`` set to the size the released weights were trained at (their sidecar says which), so
  ``monai.bundle run --config_file configs/inference.json`` needs no override;
- ``models/``: the weights, their sidecar and the out-of-distribution fit it names (``bundle_files``: what
  inference refuses to run without);
- ``bundle/``: the modules of the ``bundle`` package the configs import, derived like the serving archives'
  (``handler.shipped``): every ``bundle.x`` the configs name, then their imports, transitively;
- ``docs/README.md``: the model card, generated from metadata.json, the weights' sidecar and the model
  card section of this repository's docs/RESULTS.md;
- ``LICENSE`` (the code's; the data licence is metadata.json's ``data_license``);
- ``large_files.yml``: the files of ``models/`` with their sha256, in MONAI's format (path, url, hash_val,
  hash_type): ``monai.bundle download_large_files`` checks them, and fetches them from ``--files_url``
  when they are missing. Generated here, not kept in the repository: the hashes belong to the weights
  of one release, which the repository does not hold.

The configs and the weights come from ``--bundle_root`` (where training wrote them); the code, LICENSE
and docs/RESULTS.md from this repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import fire

from bundle import ood
from bundle.atomic import atomic_write
from bundle.labels import CLASS_NAMES
from bundle.predictor import INFERENCE_CONFIG, bundle_files
from bundle.sidecar import read_sidecar
from handler.shipped import PACKAGE, config_modules, import_closure

REPO = Path(__file__).resolve().parents[1]
METADATA = Path("configs") / "metadata.json"
LICENSE = REPO / "LICENSE"
RESULTS = REPO / "docs" / "RESULTS.md"
MODEL_CARD_HEADING = "## Model card"


def release_name(metadata: dict) -> str:
    """The bundle's name in the zip's file and folder names: metadata.json's ``name`` in snake case."""
    name = re.sub(r"[^a-z0-9]+", "_", str(metadata.get("name", "")).lower()).strip("_")
    if not name:
        raise ValueError(f"{METADATA} has no 'name' to name the release after")
    return name


def released_modules(configs_dir: str | os.PathLike) -> list[str]:
    """The ``bundle`` modules (``__init__`` included) that the configs in ``configs_dir`` import: every
    ``bundle.x`` any key of any config names (a user may run any of them), then what those modules import."""
    configs = [json.loads(path.read_text()) for path in sorted(Path(configs_dir).glob("*.json"))]
    inference = json.loads((Path(configs_dir) / INFERENCE_CONFIG.name).read_text())
    named = {"__init__"}
    for config in configs:
        for key in config:
            named |= config_modules(config, key)
    modules = sorted(name for name in named if (PACKAGE / f"{name}.py").is_file())
    return import_closure([PACKAGE / f"{name}.py" for name in modules], inference, modules)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files_yaml(models: dict[str, Path], files_url: str) -> str:
    """MONAI's ``large_files.yml`` naming ``models`` (name in the bundle's ``models/``: file) with their sha256."""
    lines = [
        "# The files of models/ with their sha256: `python -m monai.bundle download_large_files` checks them and",
        "# downloads a missing one from its url"
        + (" (empty: this release publishes them inside its zip only)." if not files_url else "."),
        "large_files:",
    ]
    for name, path in models.items():
        url = f"{files_url.rstrip('/')}/{name}" if files_url else ""
        # JSON strings are YAML strings, quoted and escaped
        lines += [
            f"  - path: {json.dumps(f'models/{name}')}",
            f"    url: {json.dumps(url)}",
            f"    hash_val: {json.dumps(sha256(path))}",
            '    hash_type: "sha256"',
        ]
    return "\n".join(lines) + "\n"


def results_model_card(results: Path = RESULTS) -> str:
    """The body of the ``## Model card`` section of docs/RESULTS.md (up to the next ``## `` heading)."""
    text = results.read_text()
    start = text.find(f"\n{MODEL_CARD_HEADING}\n")
    if start < 0:
        raise ValueError(f"{results} has no '{MODEL_CARD_HEADING}' section to put in the release's model card")
    body = text[start + len(MODEL_CARD_HEADING) + 2 :]
    end = body.find("\n## ")
    return (body if end < 0 else body[:end]).strip()


def released_weights_section(sidecar: dict, models: dict[str, Path]) -> str:
    """What the sidecar training wrote says about the released weights."""
    height, width = sidecar["image_size"]
    lines = [f"- **Trained at** {height}x{width} pixels (`image_size` in models/model.json, written by training)."]
    if "epoch" in sidecar and "metric" in sidecar:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in sidecar["metric"].items())
        lines.append(f"- **Saved at epoch** {sidecar['epoch']}, the best validation score: {scores}.")
    calibration = sidecar.get("calibration")
    if calibration:
        rule = "balanced" if calibration.get("class_bias") is not None else "argmax"
        threshold = calibration.get("refer_threshold")
        lines.append(
            f"- **Calibration** fitted on the validation split: temperature {calibration['temperature']:.4f}, "
            f"decision rule {rule}, refer threshold "
            f"{'none' if threshold is None else f'{threshold:.4f}'} (malignant probability)."
        )
    guard = sidecar.get("ood")
    if guard:
        thresholds = ", ".join(f"{method} {value:.4g}" for method, value in guard["thresholds"].items())
        statistics = ood.statistics_split(guard)
        by_class = (guard.get("class_thresholds") or {}).get("mahalanobis")
        raised = (
            ""
            if by_class is None
            else "; each class's own (an image gets its most probable class's with inference.json's "
            "`ood_thresholds` 'class', the default), raised where that class's validation images need it: mahalanobis "
            + ", ".join(f"{name} {value:.4g}" for name, value in zip(CLASS_NAMES, by_class, strict=True))
        )
        lines.append(
            f"- **Out-of-distribution guard**: statistics fitted on the {statistics} split, thresholds on the "
            f"validation split to pass {guard['target_share']:.0%} of it: {thresholds}{raised} (statistics in "
            f"models/{guard['file']})."
        )
    lines.append(f"- **Files:** {', '.join(f'models/{name}' for name in models)} (sha256 in large_files.yml).")
    return "\n".join(lines)


def model_card(metadata: dict, name: str, sidecar: dict, models: dict[str, Path]) -> str:
    """The release's docs/README.md."""
    changelog = "\n".join(f"- **{version}**: {change}" for version, change in metadata["changelog"].items())
    return f"""# {metadata["name"]} (bundle `{name}`, version {metadata["version"]})

{metadata["description"]}

**Task:** {metadata["task"]}. **Intended use:** {metadata["intended_use"]}.

## The released weights

{released_weights_section(sidecar, models)}

## Model card

The recipe's card, from the source repository's docs/RESULTS.md (its runs on real HAM10000 are there):

{results_model_card()}

## Input and output

- **Input:** {metadata["image_classes"]}.
- **Output:** {metadata["pred_classes"]}; the inference config turns them into calibrated probabilities and \
a class: {metadata["label_classes"]}.

## Run it

From this folder, with MONAI {metadata["monai_version"]}, torch {metadata["pytorch_version"]} and the \
packages in metadata.json's `required_packages_version` installed. From another folder, give `--bundle_root` \
and set `PYTHONPATH` to this folder too: the configs import this bundle's `bundle` package before MONAI adds the \
folder to Python's path (it does so only once the run starts). Training and evaluation run from this folder \
only: train.json and evaluate.json read `configs/inference.json` relative to the working folder.

    python -m monai.bundle run --config_file configs/inference.json --input path/to/images --output_dir eval
    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json
    python -m monai.bundle verify_metadata --meta_file configs/metadata.json \\
        --filepath configs/schema/metadata_schema.json
    python -m monai.bundle download_large_files --bundle_path .

`run` writes `eval/predictions.csv`: per image the calibrated probability of each class, the class the \
decision rule picks and the out-of-distribution guard's flag and score. Training (`configs/train.json`) \
reads a datalist (`--datalist`, `--dataset_dir`) written by the source repository's scripts/prepare_data.py.

## Licence

- **Code** (configs, `bundle/`): LICENSE.
- **Data and weights:** {metadata["data_license"]}

## Changelog

{changelog}

## References

{chr(10).join(f"- {reference}" for reference in metadata["references"])}
"""


def released_configs(configs_dir: Path, sidecar: dict) -> dict[str, bytes]:
    """The files of ``configs_dir`` by path inside it; inference.json and metadata.json describe the released
    weights (their sidecar): the image size they were trained at, and in metadata.json their validation score
    (``eval_metrics``, a number as the model zoo gives it) and one sentence on them after the description."""
    image_size = sidecar["image_size"]
    files = {
        path.relative_to(configs_dir).as_posix(): path.read_bytes() for path in configs_dir.rglob("*") if path.is_file()
    }
    inference = json.loads(files[INFERENCE_CONFIG.name])
    inference["image_size"] = image_size
    files[INFERENCE_CONFIG.name] = (json.dumps(inference, indent=4) + "\n").encode()
    metadata = json.loads(files[METADATA.name])
    metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] = image_size
    metadata["description"] += f" These weights were trained at {image_size[0]}x{image_size[1]}."
    if "metric" in sidecar:
        metadata["eval_metrics"] = dict(sidecar["metric"])  # e.g. val_auc: the validation macro ROC AUC
        scores = ", ".join(f"{name} {value:.4f}" for name, value in sidecar["metric"].items())
        metadata["description"] += f" Their validation score: {scores} (epoch {sidecar.get('epoch')})."
    files[METADATA.name] = (json.dumps(metadata, indent=4) + "\n").encode()
    return files


def write_release(
    bundle_root: str | os.PathLike = REPO,
    weights: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "dist",
    files_url: str = "",
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` (module docstring), replacing it; return its path.

    ``weights`` defaults to ``<bundle_root>/models/model.pt``. Raises FileNotFoundError (no weights, no
    configs) or ValueError (a sidecar that does not belong to the weights, metadata without a name or
    data licence) before anything is written.
    """
    bundle_root, weights, sidecar_file, guard_file = bundle_files(bundle_root, weights)
    metadata_file = bundle_root / METADATA
    metadata = json.loads(metadata_file.read_text())
    if not metadata.get("data_license"):
        raise ValueError(f"{metadata_file} has no 'data_license': the release must say under which licence its data is")
    bundle_name = release_name(metadata)
    sidecar = read_sidecar(weights)
    # under the names inference.json reads, whatever --weights was called; the guard's is in the sidecar
    models = {"model.pt": weights, "model.json": sidecar_file} | ({guard_file.name: guard_file} if guard_file else {})
    files = {f"configs/{path}": content for path, content in released_configs(bundle_root / "configs", sidecar).items()}
    files |= {
        f"bundle/{module}.py": (PACKAGE / f"{module}.py").read_bytes()
        for module in released_modules(bundle_root / "configs")
    }
    files |= {f"models/{name}": path.read_bytes() for name, path in models.items()}
    files["large_files.yml"] = large_files_yaml(models, files_url).encode()
    files["docs/README.md"] = model_card(metadata, bundle_name, sidecar, models).encode()
    files["LICENSE"] = LICENSE.read_bytes()

    release = Path(output_dir) / f"{bundle_name}_v{metadata['version']}.zip"
    atomic_write(release, lambda partial: write_zip(partial, bundle_name, files))
    return release


def write_zip(path: Path, folder: str, files: dict[str, bytes]) -> None:
    """``files`` (by path in the bundle) under ``folder/``: the one folder ``monai.bundle download`` extracts."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            archive.writestr(f"{folder}/{name}", files[name])


def main(
    bundle_root: str = str(REPO), weights: str | None = None, output_dir: str = "dist", files_url: str = ""
) -> None:
    """Write the release zip and print its path and size.

    Args:
        bundle_root: where the configs and the trained weights are (default: this repository).
        weights: the weights to release (default: <bundle_root>/models/model.pt, written by training).
        output_dir: where the zip goes.
        files_url: the URL the files of models/ are also published under, for large_files.yml
            (e.g. https://github.com/OWNER/REPO/releases/download/v0.3.0); empty: inside the zip only.
    """
    try:
        release = write_release(bundle_root, weights, output_dir, files_url)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {release} ({release.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    fire.Fire(main)
