"""Reading the three HAM10000 layouts, splitting by lesion, the datalist file, preflight and prepare_data.py."""

import csv
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bundle import data
from bundle.data import (
    DatasetError,
    inference_items,
    load_datalist,
    preflight,
    read_ham10000,
    split_by_lesion,
    write_datalist,
)
from bundle.labels import CLASS_NAMES, NUM_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("training", "validation", "testing")
ISIC_COLUMNS = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


# --- helpers ---------------------------------------------------------------------------------


def _metadata_rows(dataset_dir: Path) -> list[dict]:
    with (dataset_dir / "HAM10000_metadata.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _copy_flat_layout(synthetic_dir: Path, target: Path, rows: list[dict] | None = None) -> Path:
    """A flat-layout copy whose metadata rows can be altered."""
    shutil.copytree(synthetic_dir / "images", target / "images")
    rows = _metadata_rows(synthetic_dir) if rows is None else rows
    _write_csv(target / "HAM10000_metadata.csv", rows, ["lesion_id", "image_id", "dx", "dx_type", "age", "sex"])
    return target


def _official_layout(synthetic_dir: Path, root: Path, part_name: str = "HAM10000_images_part_{}") -> list[dict]:
    """The synthetic set in the official two-folder layout under ``root``; returns its metadata rows."""
    rows = _metadata_rows(synthetic_dir)
    for index, row in enumerate(rows):
        part = root / part_name.format(1 + index % 2)
        part.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic_dir / "images" / f"{row['image_id']}.jpg", part)
    return rows


def _isic_rows(synthetic_dir: Path) -> list[dict]:
    """The synthetic metadata as ISIC 2018 Task 3 one-hot rows."""
    rows = []
    for row in _metadata_rows(synthetic_dir):
        one_hot = {name.upper(): "1.0" if name == row["dx"] else "0.0" for name in CLASS_NAMES}
        rows.append({"image": row["image_id"], **one_hot})
    return rows


def _lesions(items: list[dict]) -> set[str]:
    return {item["lesion_id"] for item in items}


def _class_shares(items: list[dict]) -> np.ndarray:
    counts = Counter(item["label"] for item in items)
    return np.array([counts[label] for label in range(NUM_CLASSES)]) / len(items)


# --- real HAM10000 metadata ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_records(ham10000_dir):
    return read_ham10000(ham10000_dir)


def test_real_metadata_is_read_completely(real_records):
    assert len(real_records) == 10015
    assert len(_lesions(real_records)) == 7470
    assert Counter(CLASS_NAMES[record["label"]] for record in real_records)["nv"] == 6705


def test_real_split_keeps_lesions_together_and_covers_every_image_once(real_records):
    splits = split_by_lesion(real_records, seed=0)
    for first, second in [("training", "validation"), ("training", "testing"), ("validation", "testing")]:
        assert not _lesions(splits[first]) & _lesions(splits[second])
    image_ids = [item["image_id"] for key in SPLITS for item in splits[key]]
    assert sorted(image_ids) == sorted(record["image_id"] for record in real_records)


@pytest.mark.parametrize("seed", [0, 1])
def test_real_split_matches_requested_fractions_and_class_mix(real_records, seed):
    splits = split_by_lesion(real_records, val_frac=0.15, test_frac=0.15, seed=seed)
    whole = _class_shares(real_records)
    for key, requested in zip(SPLITS, (0.70, 0.15, 0.15), strict=True):
        assert abs(len(splits[key]) / len(real_records) - requested) < 0.01, key
        assert np.abs(_class_shares(splits[key]) - whole).max() < 0.02, key


def test_real_split_depends_only_on_the_seed(real_records):
    first = split_by_lesion(real_records, seed=0)
    assert split_by_lesion(real_records, seed=0) == first
    reordered = split_by_lesion(list(reversed(real_records)), seed=0)
    assert all(_lesions(reordered[key]) == _lesions(first[key]) for key in SPLITS)
    assert _lesions(split_by_lesion(real_records, seed=1)["testing"]) != _lesions(first["testing"])


def test_real_images_pass_preflight_on_a_sample(real_records, ham10000_dir, tmp_path):
    sample = real_records[::200]  # 51 images: enough to catch a wrong layout or unreadable files
    datalist = write_datalist({"training": sample, "validation": sample[:5]}, tmp_path / "datalist.json", ham10000_dir)
    preflight(datalist, ham10000_dir)


# --- reading the three layouts -------------------------------------------------------------------


def test_flat_layout(synthetic_dir):
    records = read_ham10000(synthetic_dir)
    rows = _metadata_rows(synthetic_dir)
    assert len(records) == len(rows) == 210
    assert records[0] == {
        "image": f"images/{rows[0]['image_id']}.jpg",
        "label": CLASS_NAMES.index(rows[0]["dx"]),
        "lesion_id": rows[0]["lesion_id"],
        "image_id": rows[0]["image_id"],
    }


def test_official_layout_finds_images_in_both_parts(synthetic_dir, tmp_path):
    rows = _official_layout(synthetic_dir, tmp_path)
    shutil.copy(synthetic_dir / "HAM10000_metadata.csv", tmp_path)
    records = read_ham10000(tmp_path)
    assert [record["image"] for record in records[:2]] == [
        f"HAM10000_images_part_1/{rows[0]['image_id']}.jpg",
        f"HAM10000_images_part_2/{rows[1]['image_id']}.jpg",
    ]
    assert [record["label"] for record in records] == [record["label"] for record in read_ham10000(synthetic_dir)]


@pytest.mark.parametrize(
    ("csv_name", "image_folder"),
    [
        ("ISIC2018_Task3_Training_GroundTruth.csv", "ISIC2018_Task3_Training_Input"),
        ("ground_truth.csv", "images"),
        ("ground_truth.csv", "."),
    ],
)
def test_isic_ground_truth_layout_warns_that_the_split_is_image_level(synthetic_dir, tmp_path, csv_name, image_folder):
    shutil.copytree(synthetic_dir / "images", tmp_path / image_folder, dirs_exist_ok=True)
    _write_csv(tmp_path / csv_name, _isic_rows(synthetic_dir), ISIC_COLUMNS)
    with pytest.warns(UserWarning, match="image-level"):
        records = read_ham10000(tmp_path)
    assert all(record["lesion_id"] == record["image_id"] for record in records)
    assert [record["label"] for record in records] == [record["label"] for record in read_ham10000(synthetic_dir)]
    assert Path(tmp_path, records[0]["image"]).is_file()


def test_a_layout_one_folder_down_in_any_case_is_found_and_its_paths_stay_relative_to_dataset_dir(
    synthetic_dir, tmp_path
):
    """An uploaded folder as a SageMaker channel holds it: the layout one level down, beside an archive
    tool's side folder and hidden files; a copy may spell the names in lower case."""
    channel = tmp_path / "channel"
    rows = _official_layout(synthetic_dir, channel / "HAM10000", "ham10000_images_part_{}")
    shutil.copy(synthetic_dir / "HAM10000_metadata.csv", channel / "HAM10000" / "ham10000_metadata.csv")
    (channel / "__MACOSX" / "HAM10000").mkdir(parents=True)
    (channel / "__MACOSX" / "HAM10000" / "._ham10000_metadata.csv").write_bytes(b"\x00\x05")
    (channel / ".DS_Store").write_bytes(b"\x00")
    records = read_ham10000(channel)
    assert [record["image"] for record in records[:2]] == [
        f"HAM10000/ham10000_images_part_1/{rows[0]['image_id']}.jpg",
        f"HAM10000/ham10000_images_part_2/{rows[1]['image_id']}.jpg",
    ]
    assert [record["label"] for record in records] == [record["label"] for record in read_ham10000(synthetic_dir)]
    path = write_datalist(split_by_lesion(records, seed=0), tmp_path / "datalist.json", channel)
    preflight(path, channel)
    (channel / "another").mkdir()  # two candidate folders: which one is meant is not guessed
    with pytest.raises(DatasetError, match=rf"no metadata CSV in {channel}: .* in its one subfolder"):
        read_ham10000(channel)


def test_the_exact_names_win_over_a_copy_in_another_case(synthetic_dir, tmp_path):
    """Kaggle's HAM10000 download holds each image folder twice: HAM10000_images_part_1, ham10000_images_part_1."""
    _official_layout(synthetic_dir, tmp_path)
    _official_layout(synthetic_dir, tmp_path, "ham10000_images_part_{}")
    shutil.copy(synthetic_dir / "HAM10000_metadata.csv", tmp_path)
    assert all(record["image"].startswith("HAM10000_images_part_") for record in read_ham10000(tmp_path))


def test_an_image_id_with_two_different_files_is_refused_and_two_identical_copies_are_one(synthetic_dir, tmp_path):
    rows = _official_layout(synthetic_dir, tmp_path)
    shutil.copy(synthetic_dir / "HAM10000_metadata.csv", tmp_path)
    first, second = rows[0]["image_id"], rows[1]["image_id"]
    shutil.copy(tmp_path / "HAM10000_images_part_1" / f"{first}.jpg", tmp_path / "HAM10000_images_part_2")
    assert read_ham10000(tmp_path)[0]["image"] == f"HAM10000_images_part_1/{first}.jpg"
    shutil.copy(synthetic_dir / "images" / f"{second}.jpg", tmp_path / "HAM10000_images_part_1" / f"{first}.jpeg")
    with pytest.raises(DatasetError) as raised:
        read_ham10000(tmp_path)
    assert (
        f"1 image id(s) with different files of that name: {first} (HAM10000_images_part_1/{first}.jpeg, "
        f"HAM10000_images_part_1/{first}.jpg, HAM10000_images_part_2/{first}.jpg)" in str(raised.value)
    )


def test_images_symlinked_from_outside_are_refused_when_read_as_preflight_would_refuse_them(synthetic_dir, tmp_path):
    dataset = tmp_path / "dataset"
    (dataset / "images").mkdir(parents=True)
    shutil.copy(synthetic_dir / "HAM10000_metadata.csv", dataset)
    for image in sorted((synthetic_dir / "images").iterdir()):
        (dataset / "images" / image.name).symlink_to(image)
    with pytest.raises(DatasetError, match=r"210 image\(s\) are symlinks resolving outside dataset_dir .*copy them in"):
        read_ham10000(dataset)


def test_images_the_metadata_does_not_list_are_left_out_with_a_warning_that_counts_them(synthetic_dir, tmp_path):
    rows = _metadata_rows(synthetic_dir)
    dataset = _copy_flat_layout(synthetic_dir, tmp_path, rows[2:])
    with pytest.warns(UserWarning, match=rf"2 image file\(s\) under {dataset} are not in its metadata and are left "
                      rf"out: {rows[0]['image_id']}, {rows[1]['image_id']}"):  # fmt: skip
        assert len(read_ham10000(dataset)) == len(rows) - 2


def test_png_and_jpeg_suffixes_are_found(synthetic_dir, tmp_path):
    dataset = _copy_flat_layout(synthetic_dir, tmp_path)
    first, second = (row["image_id"] for row in _metadata_rows(synthetic_dir)[:2])
    (dataset / "images" / f"{first}.jpg").rename(dataset / "images" / f"{first}.png")
    (dataset / "images" / f"{second}.jpg").rename(dataset / "images" / f"{second}.jpeg")
    images = [record["image"] for record in read_ham10000(dataset)[:2]]
    assert images == [f"images/{first}.png", f"images/{second}.jpeg"]


def test_missing_metadata_names_the_files_looked_for(tmp_path):
    with pytest.raises(DatasetError, match=rf"no metadata CSV in {tmp_path}: looked for HAM10000_metadata.csv"):
        read_ham10000(tmp_path)


def test_missing_dataset_dir_is_named(tmp_path):
    with pytest.raises(DatasetError, match="absent is not a directory"):
        read_ham10000(tmp_path / "absent")


def test_missing_columns_are_named(synthetic_dir, tmp_path):
    _write_csv(tmp_path / "HAM10000_metadata.csv", _metadata_rows(synthetic_dir), ["image_id", "dx"])
    with pytest.raises(DatasetError, match="lacks column\\(s\\) lesion_id"):
        read_ham10000(tmp_path)


def test_every_metadata_problem_is_reported_at_once(synthetic_dir, tmp_path):
    rows = _metadata_rows(synthetic_dir)
    rows[2]["dx"] = "melanoma"  # unknown label, CSV line 4
    rows[5]["image_id"] = "ISIC_9999999"  # no such image
    rows.append(dict(rows[0]))  # duplicate image id
    dataset = _copy_flat_layout(synthetic_dir, tmp_path, rows)
    with pytest.raises(DatasetError) as raised:
        read_ham10000(dataset)
    message = str(raised.value)
    assert "1 row(s) with dx not in akiec, bcc, bkl, df, mel, nv, vasc: line 4 'melanoma'" in message
    assert "1 image(s) not found" in message and "ISIC_9999999" in message
    assert f"listed more than once: {rows[0]['image_id']}" in message


def test_missing_images_are_counted_and_the_first_ten_named(synthetic_dir, tmp_path):
    dataset = _copy_flat_layout(synthetic_dir, tmp_path)
    removed = sorted(dataset.joinpath("images").iterdir())[:12]
    for path in removed:
        path.unlink()
    with pytest.raises(DatasetError, match=r"12 image\(s\) not found .* \.\.\. and 2 more"):
        read_ham10000(dataset)


# --- splitting ---------------------------------------------------------------------------------


def test_small_split_has_every_class_in_every_split(synthetic_dir):
    splits = split_by_lesion(read_ham10000(synthetic_dir), seed=0)
    for key in SPLITS:
        assert {item["label"] for item in splits[key]} == set(range(NUM_CLASSES)), key


def test_zero_fraction_gives_an_empty_split(synthetic_dir):
    records = read_ham10000(synthetic_dir)
    splits = split_by_lesion(records, val_frac=0.2, test_frac=0, seed=0)
    assert splits["testing"] == []
    assert len(splits["training"]) + len(splits["validation"]) == len(records)


def test_a_lesion_with_mixed_labels_stays_in_one_split():
    records = [{"image": f"{i}.jpg", "label": i % 2, "lesion_id": f"L{i // 4}", "image_id": str(i)} for i in range(80)]
    splits = split_by_lesion(records, seed=3)
    assert sum(len(splits[key]) for key in SPLITS) == len(records)
    for first, second in [("training", "validation"), ("training", "testing"), ("validation", "testing")]:
        assert not _lesions(splits[first]) & _lesions(splits[second])


@pytest.mark.parametrize(("val_frac", "test_frac"), [(-0.1, 0.1), (1.0, 0), (0.6, 0.4), (0.1, 1.2)])
def test_invalid_fractions_are_refused(val_frac, test_frac):
    with pytest.raises(ValueError, match="frac"):
        split_by_lesion([{"label": 0, "lesion_id": "L"}], val_frac=val_frac, test_frac=test_frac)


# --- the datalist file -------------------------------------------------------------------------


@pytest.fixture
def datalist(synthetic_dir, tmp_path):
    splits = split_by_lesion(read_ham10000(synthetic_dir), seed=0)
    return write_datalist(splits, tmp_path / "datalist.json", synthetic_dir)


def test_datalist_round_trip(datalist, synthetic_dir):
    content = json.loads(datalist.read_text())
    assert content["labels"] == {str(index): name for index, name in enumerate(CLASS_NAMES)}
    assert content["numTraining"] == len(content["training"])
    assert all(set(item) == {"image", "label", "lesion_id", "image_id"} for key in SPLITS for item in content[key])
    assert load_datalist(datalist, "validation") == content["validation"]
    absolute = load_datalist(datalist, "training", synthetic_dir)
    assert absolute[0]["image"] == str(synthetic_dir / content["training"][0]["image"])
    assert list(datalist.parent.iterdir()) == [datalist]  # no temporary file left behind


def test_load_datalist_names_the_file_and_key(datalist, tmp_path):
    with pytest.raises(DatasetError, match=f"datalist {tmp_path / 'absent.json'} does not exist"):
        load_datalist(tmp_path / "absent.json", "training")
    with pytest.raises(DatasetError, match="has no split 'evaluation'; its splits are \\['training', 'validation'"):
        load_datalist(datalist, "evaluation")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(DatasetError, match="broken.json is not valid JSON"):
        load_datalist(broken, "training")
    empty = write_datalist({"training": []}, tmp_path / "empty.json", tmp_path)
    with pytest.raises(DatasetError, match="split 'training' is empty"):
        load_datalist(empty, "training")


# --- preflight ---------------------------------------------------------------------------------


def test_preflight_passes_a_clean_datalist(datalist, synthetic_dir, caplog):
    caplog.set_level("INFO", logger="bundle.data")
    preflight(datalist, synthetic_dir)
    assert "preflight: " in caplog.text and " images OK" in caplog.text


def test_preflight_with_a_memo_decodes_unchanged_files_once_and_changed_ones_again(
    synthetic_dir, tmp_path, monkeypatch
):
    dataset = tmp_path / "dataset"
    shutil.copytree(synthetic_dir, dataset)
    items = read_ham10000(dataset)[:12]
    path = write_datalist({"training": items[:8], "validation": items[8:]}, tmp_path / "datalist.json", dataset)
    decoded = []
    real_decode_problem = data.decode_problem
    monkeypatch.setattr(data, "decode_problem", lambda file: decoded.append(file) or real_decode_problem(file))
    memo_dir = tmp_path / "cache"

    preflight(path, dataset, memo_dir=memo_dir)
    assert len(decoded) == 12 and len(list(memo_dir.glob("preflight-*.ok"))) == 1
    decoded.clear()
    preflight(path, dataset, memo_dir=memo_dir)
    assert decoded == []  # nothing changed: the memo stands for the decode check

    # a file rewritten in place (new size and time) is decoded again, and its fault reported
    changed = dataset / items[3]["image"]
    changed.write_bytes(changed.read_bytes()[:400])
    with pytest.raises(DatasetError, match=f"training\\[3\\] {items[3]['image']}: cannot decode"):
        preflight(path, dataset, memo_dir=memo_dir)
    assert len(decoded) == 12
    # a label fault is caught with the files unchanged and memoised, and no memo hides it
    shutil.copy(synthetic_dir / items[3]["image"], changed)
    preflight(path, dataset, memo_dir=memo_dir)
    bad_label = write_datalist(
        {"training": [{**items[0], "label": NUM_CLASSES}, *items[1:8]], "validation": items[8:]},
        tmp_path / "bad.json",
        dataset,
    )
    decoded.clear()
    with pytest.raises(DatasetError, match=f"label {NUM_CLASSES} is outside"):
        preflight(bad_label, dataset, memo_dir=memo_dir)


def test_preflight_reports_every_broken_item_at_once(synthetic_dir, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(synthetic_dir, dataset)
    good = read_ham10000(dataset)
    truncated = dataset / good[1]["image"]
    truncated.write_bytes(truncated.read_bytes()[:400])
    (dataset / "images" / "notes.jpg").write_text("not an image")
    outside = tmp_path / "outside.jpg"
    shutil.copy(dataset / good[0]["image"], outside)
    broken = [
        {**good[0], "image": "images/ISIC_9999999.jpg"},
        good[1],
        {**good[2], "image": "images/notes.jpg"},
        {**good[3], "image": str(outside)},
        {**good[4], "image": "../outside.jpg"},
        {**good[5], "label": NUM_CLASSES},
        good[6],
    ]
    path = write_datalist({"training": broken, "validation": good[7:9]}, tmp_path / "datalist.json", dataset)
    with pytest.raises(DatasetError) as raised:
        preflight(path, dataset)
    message = str(raised.value)
    assert message.startswith(f"preflight found 6 problem(s) in datalist {path}")
    for expected in [
        "training[0] images/ISIC_9999999.jpg: file not found",
        f"training[1] {good[1]['image']}: cannot decode: ",
        "training[2] images/notes.jpg: not an image file Pillow can identify",
        f"training[3] {outside}: image path must be relative to dataset_dir",
        "training[4] ../outside.jpg: image path must be relative to dataset_dir",
        f"training[5] {good[5]['image']}: label 7 is outside 0..6",
    ]:
        assert expected in message
    assert "training[6]" not in message


def test_preflight_requires_each_split(datalist, synthetic_dir, tmp_path):
    training_only = {"training": load_datalist(datalist, "training")}
    no_validation = write_datalist(training_only, tmp_path / "dl.json", synthetic_dir)
    with pytest.raises(DatasetError, match="validation: split is empty"):
        preflight(no_validation, synthetic_dir)
    with pytest.raises(DatasetError, match="evaluation: datalist .* has no split 'evaluation'"):
        preflight(datalist, synthetic_dir, keys=("training", "evaluation"))


def test_preflight_caps_the_listed_problems(synthetic_dir, tmp_path):
    missing = [{"image": f"images/absent_{i}.jpg", "label": 0, "lesion_id": "L", "image_id": str(i)} for i in range(60)]
    path = write_datalist({"training": missing, "validation": missing[:1]}, tmp_path / "dl.json", synthetic_dir)
    with pytest.raises(DatasetError, match=r"(?s)found 61 problem\(s\).*\.\.\. and 11 more$"):
        preflight(path, synthetic_dir)


def test_preflight_follows_symlinks_out_of_dataset_dir(synthetic_dir, tmp_path):
    """The path text stays inside; where it resolves to does not."""
    dataset = tmp_path / "dataset"
    shutil.copytree(synthetic_dir, dataset)
    good = read_ham10000(dataset)
    secrets = tmp_path / "elsewhere"
    secrets.mkdir()
    shutil.copy(dataset / good[0]["image"], secrets / "private.jpg")
    (dataset / "images" / "link.jpg").symlink_to(secrets / "private.jpg")
    (dataset / "linked_folder").symlink_to(secrets, target_is_directory=True)
    inside = dataset / "images" / "inside_link.jpg"
    inside.symlink_to(dataset / good[1]["image"])  # a symlink that stays inside is fine
    items = [
        {**good[2], "image": "images/link.jpg"},
        {**good[3], "image": "linked_folder/private.jpg"},
        {**good[4], "image": "images/inside_link.jpg"},
    ]
    path = write_datalist({"training": items, "validation": good[5:7]}, tmp_path / "datalist.json", dataset)
    with pytest.raises(DatasetError) as raised:
        preflight(path, dataset)
    message = str(raised.value)
    assert message.startswith(f"preflight found 2 problem(s) in datalist {path}")
    outside = secrets.resolve() / "private.jpg"
    assert f"training[0] images/link.jpg: resolves to {outside}, outside dataset_dir {dataset.resolve()}" in message
    assert f"training[1] linked_folder/private.jpg: resolves to {outside}, outside dataset_dir" in message


def test_preflight_accepts_a_dataset_dir_that_is_itself_a_symlink(datalist, synthetic_dir, tmp_path):
    (tmp_path / "mounted").symlink_to(synthetic_dir, target_is_directory=True)
    preflight(datalist, tmp_path / "mounted")


def test_inference_over_a_datalist_runs_the_preflight_without_needing_labels(datalist, synthetic_dir, tmp_path):
    content = json.loads(Path(datalist).read_text())
    unlabelled = [{"image": item["image"]} for item in content["testing"]]
    path = tmp_path / "to_classify.json"
    path.write_text(json.dumps({"testing": unlabelled}))
    assert [item["image"] for item in inference_items(path, synthetic_dir)] == [
        str(synthetic_dir / item["image"]) for item in unlabelled
    ]
    (tmp_path / "escape.jpg").symlink_to(synthetic_dir / unlabelled[0]["image"])
    path.write_text(json.dumps({"testing": [*unlabelled, {"image": "../escape.jpg"}, {"image": "images/gone.jpg"}]}))
    with pytest.raises(DatasetError) as raised:
        inference_items(path, synthetic_dir)
    assert f"testing[{len(unlabelled)}] ../escape.jpg: image path must be relative" in str(raised.value)
    assert f"testing[{len(unlabelled) + 1}] images/gone.jpg: file not found" in str(raised.value)


def test_inference_over_a_folder_skips_hidden_files_and_names_every_unreadable_image_before_any_work(
    synthetic_dir, tmp_path
):
    images = sorted((synthetic_dir / "images").glob("*.jpg"))[:3]
    folder = tmp_path / "to_classify"
    (folder / "clinic a").mkdir(parents=True)
    (folder / "__MACOSX" / "clinic a").mkdir(parents=True)
    for image in images:
        shutil.copy(image, folder / "clinic a")
        (folder / "__MACOSX" / "clinic a" / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble
    (folder / ".thumbnail.jpg").write_bytes(b"\x00")
    expected = [str(folder / "clinic a" / image.name) for image in images]
    assert [item["image"] for item in inference_items(folder, synthetic_dir)] == expected
    (folder / "clinic a" / "truncated.jpg").write_bytes(images[0].read_bytes()[:300])
    (folder / "notes.png").write_text("not an image")
    with pytest.raises(DatasetError) as raised:
        inference_items(folder, synthetic_dir)
    message = str(raised.value)
    assert message.startswith(f"input folder {folder}: 2 of 5 images cannot be classified:")
    assert "clinic a/truncated.jpg: cannot decode" in message and "notes.png: not an image file" in message


# --- prepare_data.py ---------------------------------------------------------------------------


def _prepare_data(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_data.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_prepare_data_writes_a_datalist(synthetic_dir, tmp_path):
    output = tmp_path / "datalist.json"
    result = _prepare_data("--dataset_dir", str(synthetic_dir), "--output", str(output), "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "lesions" in result.stdout and "akiec" in result.stdout
    assert sum(len(load_datalist(output, key)) for key in SPLITS) == 210


def test_prepare_data_exits_2_with_a_message_on_a_bad_folder(tmp_path):
    result = _prepare_data("--dataset_dir", str(tmp_path), "--output", str(tmp_path / "datalist.json"))
    assert result.returncode == 2
    assert "no metadata CSV" in result.stderr
    assert "Traceback" not in result.stderr
