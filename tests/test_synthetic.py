"""The synthetic dataset has HAM10000's shape, every class, several views per lesion, and never clobbers data."""

import csv
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bundle.labels import CLASS_NAMES
from bundle.synthetic import MARKER_FILE, MIN_LESIONS_PER_CLASS, generate

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def _rows(dataset_dir: Path) -> list[dict]:
    with (dataset_dir / "HAM10000_metadata.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _tiny(output_dir: Path, seed: int = 0) -> Path:
    return generate(output_dir, n_images=60, image_size=(32, 24), seed=seed)


def test_metadata_and_images_have_the_ham10000_shape(synthetic_dir):
    with (synthetic_dir / "HAM10000_metadata.csv").open(newline="") as file:
        assert next(csv.reader(file)) == COLUMNS
    rows = _rows(synthetic_dir)
    assert len(rows) == 210
    assert all(row["lesion_id"].startswith("HAM_") and row["image_id"].startswith("ISIC_") for row in rows)
    assert all(float(row["age"]) > 0 and row["sex"] in ("male", "female") for row in rows)
    for row in rows[:20]:
        with Image.open(synthetic_dir / "images" / f"{row['image_id']}.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 48))
    assert len(list((synthetic_dir / "images").iterdir())) == 210


def test_every_class_has_enough_lesions_and_nv_dominates(synthetic_dir):
    rows = _rows(synthetic_dir)
    lesions_per_class = Counter(dx for dx, _ in {(row["dx"], row["lesion_id"]) for row in rows})
    assert set(lesions_per_class) == set(CLASS_NAMES)
    assert min(lesions_per_class.values()) >= MIN_LESIONS_PER_CLASS
    images_per_class = Counter(row["dx"] for row in rows)
    assert images_per_class.most_common(1)[0][0] == "nv"


def test_lesions_have_one_to_three_views_of_one_class(synthetic_dir):
    rows = _rows(synthetic_dir)
    views = Counter(row["lesion_id"] for row in rows)
    assert set(views.values()) == {1, 2, 3}
    assert all(len({row["dx"] for row in rows if row["lesion_id"] == lesion}) == 1 for lesion in views)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first, again, other = _tiny(tmp_path / "a"), _tiny(tmp_path / "b"), _tiny(tmp_path / "c", seed=1)
    assert _rows(first) == _rows(again)
    image = f"images/{_rows(first)[0]['image_id']}.jpg"
    assert (first / image).read_bytes() == (again / image).read_bytes()
    assert (first / image).read_bytes() != (other / image).read_bytes()


def test_refuses_a_folder_with_foreign_files(tmp_path):
    (tmp_path / "thesis.docx").write_text("years of work")
    with pytest.raises(FileExistsError, match=f"refusing to write synthetic data into {tmp_path}"):
        _tiny(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["thesis.docx"]


def test_overwrites_an_earlier_synthetic_output(tmp_path):
    _tiny(tmp_path)
    stale = tmp_path / "images" / "ISIC_9999999.jpg"
    stale.write_bytes(b"left over")
    _tiny(tmp_path, seed=1)
    assert not stale.exists()
    assert (tmp_path / MARKER_FILE).is_file()
    assert len(_rows(tmp_path)) == 60


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"n_images": 10}, "n_images must be at least"), ({"image_size": (8, 8)}, "image_size"),
     ({"images_per_lesion": (3, 1)}, "images_per_lesion")],
)  # fmt: skip
def test_invalid_arguments_are_refused(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **arguments)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_synthetic_cli_runs_from_the_command_line(tmp_path):
    output = tmp_path / "synthetic"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "make_synthetic.py"), "--output_dir", str(output)]
    result = subprocess.run(command + ["--n_images", "42", "--image_size", "[32,24]"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with Image.open(output / "images" / f"{_rows(output)[0]['image_id']}.jpg") as image:
        assert image.size == (32, 24)


def test_make_synthetic_cli_exits_2_on_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(SystemExit) as exited:
        _load_script("make_synthetic").main(str(tmp_path), n_images=42)
    assert exited.value.code == 2
    assert "refusing to write" in capsys.readouterr().err
