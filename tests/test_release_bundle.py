"""The MONAI model-zoo release (scripts/release_bundle.py) as its users get it: downloaded with
``monai.bundle download`` into a fresh folder and run with MONAI's own commands, by a Python in which
nothing of this repository is importable (a fresh virtual environment that sees only the installed
dependencies: not the editable install of this project, not the checkout).
"""

import ast
import csv
import functools
import hashlib
import importlib.metadata
import json
import re
import site
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.networks.nets import DenseNet121

from bundle.data import read_ham10000, split_by_lesion, write_datalist
from bundle.labels import CLASS_NAMES
from bundle.ood import guard_file
from bundle.sidecar import read_sidecar
from tests.bundle_runs import INFERENCE, REPO, bundle_env, read_json, run_bundle
from tests.environments import only_these_packages
from tests.serving import bundle_with_random_weights, out_of_distribution_image, store_guard

# Smaller than inference.json's default: the release must carry the weights' own size into its configs.
TRAINED_SIZE = [32, 32]
METADATA = read_json(REPO / "configs" / "metadata.json")


def run(command: list, cwd: Path, env: dict, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True)
    if (result.returncode == 0) != expect_ok:
        raise AssertionError(
            f"{command} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-5000:]}"
        )
    return result


def release(bundle_root: Path, output_dir: Path, *options, expect_ok: bool = True) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's code, not whichever one the editable install points at
    env = dict(bundle_env(), PYTHONPATH=str(REPO))
    command = [sys.executable, "scripts/release_bundle.py", "--bundle_root", bundle_root, "--output_dir", output_dir]
    return run([*command, *options], REPO, env, expect_ok)


@pytest.fixture(scope="module")
def released(tmp_path_factory, synthetic_dir) -> dict:
    """Random weights trained (says their sidecar) at TRAINED_SIZE, with a fitted out-of-distribution guard,
    released to a zip from another name than the configs read (``--weights``: the release renames them)."""
    root = bundle_with_random_weights(tmp_path_factory.mktemp("trained"), trained_image_size=TRAINED_SIZE)
    store_guard(root, synthetic_dir)
    weights = root / "chosen" / "best.pt"
    (root / "models").rename(weights.parent)
    (weights.parent / "model.pt").rename(weights)
    (weights.parent / "model.json").rename(weights.with_suffix(".json"))
    dist = tmp_path_factory.mktemp("dist")
    output = release(root, dist, "--weights", weights).stdout
    (zip_path,) = dist.glob("*.zip")
    assert str(zip_path) in output
    return {"bundle_root": root, "weights": weights, "zip": zip_path}


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory) -> Path:
    """A Python seeing the installed packages only: a fresh venv whose one .pth names the test venv's
    site-packages. A folder named in a .pth is added to the path, but its own .pth files (this project's
    editable install among them) are not run."""
    env = tmp_path_factory.mktemp("clean_env")
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, {}).stdout
    Path(purelib.strip(), "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@functools.cache
def clean_env() -> dict:
    """The bundle's environment with only the packages the release declares importable (metadata.json: MONAI,
    torch and required_packages_version; pip's dependencies of those), as in a user's fresh install of them."""
    declared = [f"monai=={METADATA['monai_version']}", "torch", "numpy", *METADATA["required_packages_version"]]
    only_declared = only_these_packages(declared, Path(tempfile.mkdtemp(prefix="release-packages-")))
    return {key: value for key, value in bundle_env().items() if key != "PYTHONPATH"} | only_declared


@pytest.fixture(scope="module")
def downloaded(released, clean_python, tmp_path_factory) -> Path:
    """The release as ``monai.bundle download --url file://...`` puts it into a fresh folder: the bundle's folder."""
    with zipfile.ZipFile(released["zip"]) as archive:
        (name,) = {entry.split("/")[0] for entry in archive.namelist()}
    folder = tmp_path_factory.mktemp("downloads")
    url = released["zip"].as_uri()
    run(
        [clean_python, "-m", "monai.bundle", "download", "--name", name, "--url", url, "--bundle_dir", "."],
        folder,
        clean_env(),
    )
    return folder / name


def test_the_zip_is_named_and_laid_out_as_the_model_zoo_expects(released, downloaded):
    assert released["zip"].name == f"{downloaded.name}_v{METADATA['version']}.zip"
    weights = released["weights"]
    sources = {
        "model.pt": weights,
        "model.json": weights.with_suffix(".json"),
        guard_file(weights).name: guard_file(weights),
    }
    assert {path.name for path in (downloaded / "models").iterdir()} == set(sources)
    for name, source in sources.items():
        assert (downloaded / "models" / name).read_bytes() == source.read_bytes()
    assert (downloaded / "LICENSE").read_text().startswith((REPO / "LICENSE").read_text()[:200])
    metadata = read_json(downloaded / "configs" / "metadata.json")
    assert metadata["version"] in metadata["changelog"] and "CC BY-NC 4.0" in metadata["data_license"]
    # the configs say the size the weights were trained at, so a bare `run` uses the right one
    assert read_json(downloaded / "configs" / "inference.json")["image_size"] == TRAINED_SIZE
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == TRAINED_SIZE
    assert metadata["description"].endswith("These weights were trained at 32x32.")
    # the serving-only modules stay out: no config imports them
    shipped = {path.stem for path in (downloaded / "bundle").glob("*.py")}
    assert {"__init__", "data", "handlers", "imageio", "inferers", "ood", "sidecar", "training"} <= shipped
    assert not {"predictor", "payloads", "synthetic"} & shipped


def test_the_released_metadata_gives_the_weights_validation_score_as_a_number():
    sys.path.insert(0, str(REPO / "scripts"))
    import release_bundle

    sidecar = {"image_size": [128, 128], "metric": {"val_auc": 0.9371}, "epoch": 17}
    metadata = json.loads(release_bundle.released_configs(REPO / "configs", sidecar)["metadata.json"])
    assert metadata["eval_metrics"] == {"val_auc": 0.9371}
    assert metadata["description"].endswith("trained at 128x128. Their validation score: val_auc 0.9371 (epoch 17).")


def test_the_model_card_describes_the_released_weights(downloaded):
    card = (downloaded / "docs" / "README.md").read_text()
    sidecar = read_sidecar(downloaded / "models" / "model.pt")
    assert f"{METADATA['name']} (bundle `{downloaded.name}`, version {METADATA['version']})" in card
    assert "Trained at 32x32 pixels" in card.replace("**", "")
    assert sidecar["ood"]["file"] in card and "## Model card" in card and METADATA["data_license"] in card
    vasc = sidecar["ood"]["class_thresholds"]["mahalanobis"][-1]
    assert f"vasc {vasc:.4g}" in card, "each class's served threshold"


def test_the_bundle_imports_its_own_code_and_nothing_of_the_repository(downloaded, clean_python):
    probe = (
        "import importlib.util, json, sys, bundle\n"
        # the packages this project installs beside bundle: importable only through its editable install
        "others = {name: importlib.util.find_spec(name) is not None for name in ('handler', 'cloud')}\n"
        "print(json.dumps({'bundle': bundle.__file__, 'path': sys.path, 'others': others}))"
    )
    found = json.loads(run([clean_python, "-c", probe], downloaded, clean_env()).stdout)
    assert Path(found["bundle"]).resolve() == (downloaded / "bundle" / "__init__.py").resolve()
    assert not any(found["others"].values()), found["others"]
    assert str(REPO) not in found["path"]


def test_metadata_and_network_verify_with_monai_commands(downloaded, clean_python):
    verify_metadata = ["verify_metadata", "--meta_file", "configs/metadata.json"]
    run(
        [clean_python, "-m", "monai.bundle", *verify_metadata, "--filepath", "configs/schema/metadata_schema.json"],
        downloaded,
        clean_env(),
    )
    verify_net = ["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json"]
    result = run(
        [clean_python, "-m", "monai.bundle", *verify_net, "--config_file", "configs/inference.json"],
        downloaded,
        clean_env(),
    )
    assert "verified with no error" in result.stdout + result.stderr


def test_large_files_name_the_model_files_with_their_hashes(downloaded, clean_python):
    entries = yaml.safe_load((downloaded / "large_files.yml").read_text())["large_files"]
    assert {entry["path"] for entry in entries} == {f"models/{path.name}" for path in (downloaded / "models").iterdir()}
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"} and entry["hash_type"] == "sha256"
        assert entry["hash_val"] == hashlib.sha256((downloaded / entry["path"]).read_bytes()).hexdigest()
    # MONAI's own reader checks each present file against its hash (and would download a missing one)
    result = run(
        [clean_python, "-m", "monai.bundle", "download_large_files", "--bundle_path", "."], downloaded, clean_env()
    )
    assert result.stdout.count("Verified") + result.stderr.count("Verified") == len(entries)


def predictions(path: Path) -> dict[str, dict]:
    with open(path, newline="") as file:
        return {Path(row["image"]).name: row for row in csv.DictReader(file)}


def test_inference_from_the_zip_equals_the_repository_inference(
    released, downloaded, clean_python, synthetic_dir, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((synthetic_dir / "images").glob("*.jpg"))[:6]:
        (images / source.name).write_bytes(source.read_bytes())
    (images / "green.jpg").write_bytes(out_of_distribution_image())
    overrides = ["--input", images, "--num_workers", 0]
    bundle_run = [clean_python, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    run([*bundle_run, *overrides, "--output_dir", tmp_path / "from_zip"], downloaded, clean_env())
    run_bundle(
        INFERENCE,
        bundle_root=released["bundle_root"],
        ckpt_path=released["weights"],
        input=images,
        output_dir=tmp_path / "from_repository",
        image_size=json.dumps(TRAINED_SIZE).replace(" ", ""),
        num_workers=0,
    )
    from_zip = predictions(tmp_path / "from_zip" / "predictions.csv")
    from_repository = predictions(tmp_path / "from_repository" / "predictions.csv")
    assert from_zip.keys() == from_repository.keys() == {path.name for path in images.iterdir()}
    assert from_zip["green.jpg"]["out_of_distribution"] == "true"
    for image, row in from_zip.items():
        expected = from_repository[image]
        for column in ("predicted_class", "decision_rule", "out_of_distribution"):
            assert row[column] == expected[column], (image, column)
        numbers = [f"p_{name}" for name in CLASS_NAMES] + ["malignant_probability", "ood_score"]
        got = [float(row[column] or "nan") for column in numbers]
        np.testing.assert_allclose(got, [float(expected[column] or "nan") for column in numbers], atol=1e-5)


def released_network(weights: Path) -> torch.nn.Module:
    network = DenseNet121(spatial_dims=2, in_channels=3, out_channels=len(CLASS_NAMES))
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval()


def test_monai_load_builds_the_released_network(released, downloaded, clean_python, tmp_path):
    x = torch.rand(2, 3, *TRAINED_SIZE, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from monai.bundle import load\n"
        f"network = load({downloaded.name!r}, bundle_dir={str(downloaded.parent)!r},\n"
        "    workflow_type='inference', device='cpu')\n"
        "with torch.no_grad():\n"
        f"    torch.save(network.eval()(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
    )
    run([clean_python, "-c", script], downloaded, clean_env())
    with torch.no_grad():
        expected = released_network(released["weights"])(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=1e-5)


def test_the_torchscript_export_gives_the_same_logits(released, downloaded, clean_python, tmp_path):
    exported = tmp_path / "model.ts"
    export = ["ckpt_export", "network_def", "--filepath", exported, "--ckpt_file", "models/model.pt"]
    configs = ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    run([clean_python, "-m", "monai.bundle", *export, *configs], downloaded, clean_env())
    x = torch.rand(2, 3, *TRAINED_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scripted = torch.jit.load(str(exported), map_location="cpu").eval()(x)
        expected = released_network(released["weights"])(x)
    torch.testing.assert_close(scripted, expected, atol=1e-5, rtol=1e-5)


def test_the_shipped_modules_import_only_declared_packages(downloaded):
    """What runs from the zip needs MONAI, torch, numpy and metadata.json's required packages, nothing else."""
    metadata = read_json(downloaded / "configs" / "metadata.json")
    declared = {"monai", "torch", "numpy", *metadata["required_packages_version"]}
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for source in (downloaded / "bundle").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"bundle", "__future__"}
    needed = {distributions[name][0].lower() for name in third_party}
    assert needed <= declared, needed - declared


def test_the_release_version_is_the_package_version():
    (version,) = re.findall(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert version == METADATA["version"]


def test_a_release_without_trained_weights_names_the_missing_file(tmp_path):
    root = tmp_path / "untrained"
    root.mkdir()
    (root / "configs").symlink_to(REPO / "configs")
    result = release(root, tmp_path / "dist", expect_ok=False)
    assert f"weights {root / 'models' / 'model.pt'} not found" in result.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_the_bundle_trains_from_the_zip(downloaded, clean_python, synthetic_dir, tmp_path):
    """train.json ships too, so the modules it imports do: one epoch from the bundle's folder saves weights with
    their calibration and out-of-distribution fit."""
    datalist = write_datalist(
        split_by_lesion(read_ham10000(synthetic_dir), seed=0), tmp_path / "datalist.json", synthetic_dir
    )
    training = ["--dataset_dir", synthetic_dir, "--datalist", datalist, "--bundle_root", tmp_path, "--max_epochs", 1]
    fast = ["--image_size", json.dumps(TRAINED_SIZE).replace(" ", ""), "--batch_size", 32, "--num_workers", 0]
    command = [clean_python, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", *training, *fast]
    run(command, downloaded, clean_env())
    sidecar = read_sidecar(tmp_path / "models" / "model.pt")
    assert sidecar["image_size"] == TRAINED_SIZE and sidecar["calibration"] and sidecar["ood"]
    assert guard_file(tmp_path / "models" / "model.pt").is_file()
