"""Both archives carry the serving subset of the bundle package and serve with it alone."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bundle import SERVING_MODULES
from bundle.labels import CLASS_NAMES
from bundle.synthetic import generate
from tests.bundle_runs import REPO
from tests.serving import bundle_with_random_weights, sagemaker_model_dir

SHIPPED = sorted(f"{name}.py" for name in SERVING_MODULES)
# Run in the extracted archive with nothing of the repository importable: `-I` drops the working
# directory's and the user's paths, and the editable install's finder is removed before importing.
SERVE_ONE_IMAGE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from bundle.predictor import Predictor
import bundle
assert Path(bundle.__file__).parent == Path(sys.argv[2]).resolve(), bundle.__file__
(result,) = Predictor(sys.argv[3], sys.argv[4]).predict([Path(sys.argv[5]).read_bytes()])
print(result.to_json()["class"])
try:
    import bundle.synthetic
except ImportError:
    print("no synthetic")
"""


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    return bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=[32, 32])


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    images = generate(tmp_path_factory.mktemp("images"), n_images=42, image_size=(64, 48), seed=3) / "images"
    return sorted(images.glob("*.jpg"))[0]


def _run(command: list[str], cwd: Path = REPO) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _serve_one_image(import_root: Path, model_dir: Path, weights: Path, image: Path) -> list[str]:
    return _run(
        [
            sys.executable,
            "-I",
            "-c",
            SERVE_ONE_IMAGE,
            str(import_root),
            str(import_root / "bundle"),
            str(model_dir),
            str(weights),
            str(image),
        ],
        cwd=import_root,
    ).split()


def test_the_mar_ships_the_serving_modules_and_serves_with_them_alone(bundle_root, image, tmp_path):
    _run(
        [
            sys.executable,
            "scripts/package_mar.py",
            "--bundle_root",
            str(bundle_root),
            "--export_path",
            str(tmp_path / "dist"),
        ]
    )
    with zipfile.ZipFile(tmp_path / "dist" / "skin_lesion.mar") as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "mar")
    assert sorted(Path(n).name for n in names if n.startswith("bundle/")) == SHIPPED
    model_dir = tmp_path / "mar"
    answer = _serve_one_image(model_dir, model_dir, model_dir / "model.pt", image)
    assert answer[0] in CLASS_NAMES and answer[1:] == ["no", "synthetic"]


def test_the_sagemaker_model_ships_the_serving_modules_and_serves_with_them_alone(bundle_root, image, tmp_path):
    model_dir = sagemaker_model_dir(bundle_root, tmp_path)
    assert sorted(path.name for path in (model_dir / "code" / "bundle").iterdir()) == SHIPPED
    answer = _serve_one_image(model_dir / "code", model_dir, model_dir / "models" / "model.pt", image)
    assert answer[0] in CLASS_NAMES and answer[1:] == ["no", "synthetic"]


def test_the_project_installs_as_a_package_into_a_fresh_venv(tmp_path):
    """`pip install .`: bundle, handler (with its server settings) and cloud import from site-packages.
    The wheel goes in without its dependencies, which `import bundle, handler, cloud` doesn't load."""
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheel"),
            str(REPO),
        ]
    )
    _run([sys.executable, "-m", "venv", str(tmp_path / "venv")])
    python = tmp_path / "venv" / "bin" / "python"
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)])
    where = _run(
        [
            str(python),
            "-I",
            "-c",
            "import bundle, handler, cloud, pathlib; "
            "print(pathlib.Path(bundle.__file__).parents[1]); "
            "print((pathlib.Path(handler.__file__).parent / 'config.properties').is_file()); "
            "print(handler.MODEL_NAME)",
        ],
        cwd=tmp_path,
    ).split()
    assert where[0].endswith("site-packages") and where[1:] == ["True", "skin_lesion"]
