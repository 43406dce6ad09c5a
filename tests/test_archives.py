"""Both archives carry the serving subset of the bundle package and serve with it alone."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bundle.labels import CLASS_NAMES
from bundle.synthetic import generate
from handler.shipped import serving_modules
from tests.bundle_runs import REPO
from tests.serving import (
    FLAGGED_FIELDS,
    SERVED_FIELDS,
    bundle_with_random_weights,
    out_of_distribution_image,
    sagemaker_model_dir,
    store_guard,
)

SHIPPED = sorted(f"{name}.py" for name in serving_modules(REPO))
# Run in the extracted archive with nothing of the repository importable: `-I` drops the working
# directory's and the user's paths, and the editable install's finder is removed before importing. Each
# script imports the archive's own entry point (argv[1]: the folder it sits in, argv[2]: the model dir) and
# answers a lesion image and an out-of-distribution one (argv[3], argv[4]) through it, one JSON line each.
ISOLATED = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
sys.path.insert(0, sys.argv[1])
import json
from pathlib import Path
images = [Path(sys.argv[3]).read_bytes(), Path(sys.argv[4]).read_bytes()]
"""
# TorchServe's own Context (and metrics cache) around the archived handler, as a worker builds it.
THROUGH_THE_HANDLER = (
    ISOLATED
    + """
import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
import skin_lesion_handler
metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
metrics.initialize_cache()
import yaml
manifest = json.loads((Path(sys.argv[2]) / "MAR-INF" / "MANIFEST.json").read_text())
model_config = Path(sys.argv[2]) / manifest["model"].get("configFile", "none")
model_yaml = yaml.safe_load(model_config.read_text()) if model_config.is_file() else {}
context = Context("skin_lesion", sys.argv[2], manifest, 2, None, "test", metrics=metrics, model_yaml_config=model_yaml)
context.request_processor = [RequestProcessor({"body": {"content-type": "image/jpeg"}}) for _ in images]
handler = skin_lesion_handler.SkinLesionHandler()
handler.initialize(context)
for answer in handler.handle([{"body": image} for image in images], context):
    print(answer)
"""
)
# The four functions of the SageMaker PyTorch inference toolkit, as the container calls them.
THROUGH_THE_ADAPTER = (
    ISOLATED
    + """
import inference
model = inference.model_fn(sys.argv[2])
for image in images:
    results = inference.predict_fn(inference.input_fn(image, "image/jpeg"), model)
    print(inference.output_fn(results, "application/json")[0])
"""
)
WHAT_WAS_IMPORTED = """
import bundle
print(json.dumps({"bundle": str(Path(bundle.__file__).parent), "synthetic": "bundle.synthetic" in sys.modules,
                  "training": "bundle.training" in sys.modules}))
"""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("images"), n_images=42, image_size=(64, 48), seed=3)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory, synthetic):
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=[32, 32])
    store_guard(root, synthetic)
    return root


@pytest.fixture(scope="module")
def images(synthetic, tmp_path_factory):
    folder = tmp_path_factory.mktemp("requests")
    (folder / "green.jpg").write_bytes(out_of_distribution_image())
    return sorted((synthetic / "images").glob("*.jpg"))[0], folder / "green.jpg"


def _run(command: list[str], cwd: Path = REPO) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _isolated(script: str, import_root: Path, model_dir: Path, images: tuple[Path, Path]) -> list[dict]:
    lines = _run(
        [sys.executable, "-I", "-c", script + WHAT_WAS_IMPORTED, str(import_root), str(model_dir), *map(str, images)],
        cwd=import_root,
    ).splitlines()
    *answers, imported = [json.loads(line) for line in lines if line.startswith("{")]
    # the archive's own bundle package, and nothing of training came along
    assert Path(imported["bundle"]) == (import_root / "bundle").resolve(), imported
    assert not imported["synthetic"] and not imported["training"], imported
    return answers


def _assert_lesion_answered_and_frame_flagged(answers: list[dict]) -> None:
    lesion, frame = answers
    assert set(lesion) == SERVED_FIELDS and lesion["class"] in CLASS_NAMES and lesion["out_of_distribution"] is False
    assert set(frame) == FLAGGED_FIELDS and frame["class"] is None and frame["out_of_distribution"] is True


def test_the_shipped_modules_are_what_serving_imports():
    """Derived from the handler's and the adapter's imports and the inference config they parse."""
    shipped = serving_modules(REPO)
    assert {"predictor", "payloads", "ood", "imageio", "inferers", "calibration", "sidecar"} <= set(shipped)
    assert not {"training", "synthetic", "handlers", "plots", "data", "cache", "augment"} & set(shipped)


def test_the_mar_ships_the_serving_modules_and_serves_with_them_alone(bundle_root, images, tmp_path):
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
    _assert_lesion_answered_and_frame_flagged(_isolated(THROUGH_THE_HANDLER, model_dir, model_dir, images))


def test_the_sagemaker_model_ships_the_serving_modules_and_serves_with_them_alone(bundle_root, images, tmp_path):
    model_dir = sagemaker_model_dir(bundle_root, tmp_path)
    assert sorted(path.name for path in (model_dir / "code" / "bundle").iterdir()) == SHIPPED
    answers = _isolated(THROUGH_THE_ADAPTER, model_dir / "code", model_dir, images)
    _assert_lesion_answered_and_frame_flagged(answers)
    # the handler the container's TorchServe actually runs (MAR-INF/MANIFEST.json names it) serves alike (one
    # batch of two there, two batches of one here: equal up to float rounding)
    for handled, adapted in zip(
        _isolated(THROUGH_THE_HANDLER, model_dir / "code", model_dir, images), answers, strict=True
    ):
        assert handled.keys() == adapted.keys() and handled["class"] == adapted["class"]
        assert handled["out_of_distribution"] is adapted["out_of_distribution"]
        assert handled["ood_score"] == pytest.approx(adapted["ood_score"], rel=1e-4)


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
