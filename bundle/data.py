"""Read HAM10000 metadata, split it by lesion, write and load the datalist, and check it before training.

The split is by ``lesion_id``: about a quarter of HAM10000 images are further views of a lesion
seen in another image, so an image-level split would put the same lesion in training and test.
"""

from __future__ import annotations

import csv
import filecmp
import hashlib
import json
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from bundle.atomic import atomic_write
from bundle.imageio import decode_problem
from bundle.labels import CLASS_NAMES, NUM_CLASSES

logger = logging.getLogger(__name__)

HAM_METADATA_CSV = "HAM10000_metadata.csv"
HAM_COLUMNS = ("lesion_id", "image_id", "dx")
HAM_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images")

ISIC_GROUND_TRUTH_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_COLUMNS = ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_IMAGE_DIRS = ("ISIC2018_Task3_Training_Input", "images", ".")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_KEYS = ("training", "validation", "testing")
RECORD_KEYS = ("image", "label", "lesion_id", "image_id")

MAX_LISTED = 10  # examples named per problem in read_ham10000's errors
MAX_REPORTED = 50  # problem lines printed by preflight


class DatasetError(ValueError):
    """The dataset or datalist on disk cannot be used; the message lists every problem found."""


# ---------------------------------------------------------------------------------------------
# Reading the metadata
# ---------------------------------------------------------------------------------------------


def read_ham10000(dataset_dir: str | os.PathLike) -> list[dict]:
    """Return one record per image: ``{"image", "label", "lesion_id", "image_id"}``.

    ``image`` is the POSIX path relative to ``dataset_dir``; ``label`` indexes ``CLASS_NAMES``.
    Accepts the official layout (metadata CSV + ``HAM10000_images_part_{1,2}/``), the flat one
    (metadata CSV + ``images/``) and the ISIC 2018 Task 3 one-hot ground-truth CSV; file and folder
    names in any case, and the whole layout one folder down when ``dataset_dir`` holds nothing else
    (an archive unpacked into a folder of its own, as a SageMaker channel of an uploaded folder may be).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset_dir {dataset_dir} is not a directory")
    csv_path, is_isic = _find_metadata_csv(dataset_dir)
    header, rows = _read_csv(csv_path)
    if is_isic:
        warnings.warn(
            f"{csv_path} has no lesion ids: each image is its own lesion, so the split is image-level "
            "and test scores may leak between views of the same lesion",
            stacklevel=2,
        )
        rows_ok, problems = _parse_isic_rows(csv_path, header, rows)
        image_dirs = ISIC_IMAGE_DIRS
    else:
        rows_ok, problems = _parse_ham_rows(csv_path, header, rows)
        image_dirs = HAM_IMAGE_DIRS
    problems += _duplicate_problems(csv_path, rows_ok)
    index = _index_images(csv_path.parent, image_dirs)
    looked_in = f"in {', '.join(f'{folder}/' for folder in image_dirs)} under {csv_path.parent}"
    records, image_problems = _attach_image_paths(dataset_dir, index, looked_in, rows_ok)
    problems += image_problems
    if problems:
        raise DatasetError(f"cannot read dataset {dataset_dir}:\n  " + "\n  ".join(problems))
    unlisted = sorted(set(index) - {record["image_id"] for record in records})
    if unlisted:  # not an error (a folder may hold more than one dataset), but nothing is left out unsaid
        warnings.warn(
            f"{len(unlisted)} image file(s) under {csv_path.parent} are not in its metadata and are left out: "
            f"{_first(unlisted)}",
            stacklevel=2,
        )
    return records


def _find_metadata_csv(dataset_dir: Path) -> tuple[Path, bool]:
    """Return the metadata CSV and whether it is in the ISIC one-hot format."""
    found = _metadata_csv_in(dataset_dir)
    if found is None:
        entries = _visible_entries(dataset_dir)
        if len(entries) == 1 and entries[0].is_dir():  # the layout one folder down
            found = _metadata_csv_in(entries[0])
    if found is None:
        raise DatasetError(
            f"no metadata CSV in {dataset_dir}: looked for {HAM_METADATA_CSV}, {ISIC_GROUND_TRUTH_CSV}, "
            f"or any *.csv with the header {','.join(ISIC_COLUMNS)} (in any case, and in its one subfolder "
            "when it holds nothing else)"
        )
    return found


def _metadata_csv_in(folder: Path) -> tuple[Path, bool] | None:
    for name, is_isic in ((HAM_METADATA_CSV, False), (ISIC_GROUND_TRUTH_CSV, True)):
        path = _named(folder, name)
        if path is not None and path.is_file():
            return path, is_isic
    for candidate in sorted(folder.glob("*.csv")):
        if _read_header(candidate) == list(ISIC_COLUMNS):
            return candidate, True
    return None


def _visible_entries(folder: Path) -> list[Path]:
    """The folder's entries without hidden ones and archive tools' side folders (macOS ``__MACOSX``)."""
    return sorted(entry for entry in folder.iterdir() if not _hidden(Path(entry.name)))


def _named(folder: Path, name: str) -> Path | None:
    """``folder / name`` as spelt, else the one entry whose name matches it in another case."""
    if (folder / name).exists():
        return folder / name
    matches = [entry for entry in folder.iterdir() if entry.name.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def _read_header(path: Path) -> list[str]:
    """The CSV's column names, or [] for a file that is not a readable UTF-8 CSV."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            return [name.strip() for name in next(csv.reader(file), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            header = [name.strip() for name in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    stripped = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]
    return header, stripped


def _require_columns(csv_path: Path, header: list[str], required: tuple[str, ...]) -> None:
    missing = [name for name in required if name not in header]
    if missing:
        raise DatasetError(f"{csv_path} lacks column(s) {', '.join(missing)}; its header is {','.join(header)}")


def _parse_ham_rows(csv_path: Path, header: list[str], rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows as ``{"image_id", "lesion_id", "label"}``; unknown dx and blank ids become problems."""
    _require_columns(csv_path, header, HAM_COLUMNS)
    parsed, unknown_dx, blank_ids = [], [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if not row["image_id"] or not row["lesion_id"]:
            blank_ids.append(f"line {line}")
        elif row["dx"] not in CLASS_NAMES:
            unknown_dx.append(f"line {line} {row['dx']!r}")
        else:
            parsed.append(
                {"image_id": row["image_id"], "lesion_id": row["lesion_id"], "label": CLASS_NAMES.index(row["dx"])}
            )
    problems = []
    if unknown_dx:
        problems.append(
            f"{csv_path}: {len(unknown_dx)} row(s) with dx not in {', '.join(CLASS_NAMES)}: {_first(unknown_dx)}"
        )
    if blank_ids:
        problems.append(f"{csv_path}: {len(blank_ids)} row(s) with a blank image_id or lesion_id: {_first(blank_ids)}")
    return parsed, problems


def _parse_isic_rows(csv_path: Path, header: list[str], rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows as ``{"image_id", "lesion_id", "label"}`` from one-hot columns; the image is its own lesion."""
    _require_columns(csv_path, header, ISIC_COLUMNS)
    class_columns = ISIC_COLUMNS[1:]
    parsed, bad_rows = [], []
    for line, row in enumerate(rows, start=2):
        try:
            scores = [float(row[column]) for column in class_columns]
        except ValueError:
            scores = []
        hot = [column for column, score in zip(class_columns, scores, strict=False) if score == 1.0]
        if not row["image"] or len(hot) != 1 or sum(scores) != 1.0:
            bad_rows.append(f"line {line}")
            continue
        label = CLASS_NAMES.index(hot[0].lower())
        parsed.append({"image_id": row["image"], "lesion_id": row["image"], "label": label})
    problems = []
    if bad_rows:
        problems.append(
            f"{csv_path}: {len(bad_rows)} row(s) without an image name and exactly one class column "
            f"equal to 1: {_first(bad_rows)}"
        )
    return parsed, problems


def _duplicate_problems(csv_path: Path, rows: list[dict]) -> list[str]:
    counts = Counter(row["image_id"] for row in rows)
    duplicates = sorted(image_id for image_id, count in counts.items() if count > 1)
    if not duplicates:
        return []
    return [f"{csv_path}: {len(duplicates)} image id(s) listed more than once: {_first(duplicates)}"]


def _attach_image_paths(
    dataset_dir: Path, index: dict[str, list[Path]], looked_in: str, rows: list[dict]
) -> tuple[list[dict], list[str]]:
    """Each row's image, from ``_index_images``; ``looked_in`` says where, for the message on missing ones."""
    records, missing, ambiguous, outside = [], [], [], []
    root = dataset_dir.resolve()
    for row in rows:
        files = index.get(row["image_id"], [])
        if not files:
            missing.append(row["image_id"])
            continue
        if any(not filecmp.cmp(files[0], other, shallow=False) for other in files[1:]):
            ambiguous.append(f"{row['image_id']} ({', '.join(_relative(file, dataset_dir) for file in files)})")
            continue
        resolved = files[0].resolve()
        if not resolved.is_relative_to(root):  # as preflight refuses it: say so before the split
            outside.append(f"{_relative(files[0], dataset_dir)} -> {resolved}")
            continue
        records.append(
            {
                "image": _relative(files[0], dataset_dir),
                "label": row["label"],
                "lesion_id": row["lesion_id"],
                "image_id": row["image_id"],
            }
        )
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} image(s) not found as <image_id>{{{','.join(IMAGE_SUFFIXES)}}} {looked_in}: "
            f"{_first(missing)}"
        )
    if ambiguous:
        problems.append(f"{len(ambiguous)} image id(s) with different files of that name: {_first(ambiguous)}")
    if outside:
        problems.append(
            f"{len(outside)} image(s) are symlinks resolving outside dataset_dir {root}, which training "
            f"refuses (copy them in instead): {_first(outside)}"
        )
    return (records, []) if not problems else ([], problems)


def _index_images(layout_root: Path, image_dirs: tuple[str, ...]) -> dict[str, list[Path]]:
    """Map image id (file stem) to its files, earlier folders first; folder names match in any case."""
    index: dict[str, list[Path]] = {}
    for folder in image_dirs:
        directory = _named(layout_root, folder)
        if directory is None or not directory.is_dir():
            continue
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda entry: entry.name):
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                    index.setdefault(stem, []).append(directory / entry.name)
    return index


def _relative(file: Path, dataset_dir: Path) -> str:
    return file.relative_to(dataset_dir).as_posix()


def _first(items: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def split_by_lesion(
    records: list[dict], val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0
) -> dict[str, list[dict]]:
    """Split records into ``training``/``validation``/``testing`` with every lesion in exactly one split.

    Stratified by class (a lesion's class is its most frequent label) and balanced by image count,
    so each split's image fraction and class mix match the whole. All three keys are always present;
    a split with fraction 0 is an empty list. Deterministic for a given ``seed``.
    """
    fractions = _validated_fractions(val_frac, test_frac)
    if not records:
        raise DatasetError("no records to split")
    lesions = _group_by_lesion(records)
    rng = np.random.default_rng(seed)
    assigned: dict[str, list[int]] = {key: [] for key in SPLIT_KEYS}
    for label in range(NUM_CLASSES):
        class_lesions = [indices for lesion_label, indices in lesions if lesion_label == label]
        for key, indices in _assign_class_lesions(class_lesions, fractions, rng).items():
            assigned[key] += indices
    return {key: [records[i] for i in sorted(indices)] for key, indices in assigned.items()}


def _validated_fractions(val_frac: float, test_frac: float) -> dict[str, float]:
    for name, value in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_frac + test_frac >= 1:
        raise ValueError(f"val_frac + test_frac must be below 1, got {val_frac} + {test_frac}")
    return {"training": 1 - val_frac - test_frac, "validation": val_frac, "testing": test_frac}


def _group_by_lesion(records: list[dict]) -> list[tuple[int, list[int]]]:
    """``(class, record indices)`` per lesion, in lesion-id order so the result ignores row order."""
    indices_by_lesion: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        indices_by_lesion[record["lesion_id"]].append(index)
    lesions = []
    for lesion_id in sorted(indices_by_lesion):
        indices = indices_by_lesion[lesion_id]
        label_counts = Counter(records[i]["label"] for i in indices)
        majority = min(label_counts, key=lambda label: (-label_counts[label], label))
        lesions.append((majority, indices))
    return lesions


def _assign_class_lesions(
    lesions: list[list[int]], fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, list[int]]:
    """Greedily give each lesion to the split whose image quota for this class is least filled.

    Lesions go largest first (random order among equal sizes), so the many single-image lesions at
    the end even out what the big ones overshot. Filling by relative deficit gives every split with
    a non-zero fraction a lesion of this class as soon as the class has enough lesions.
    """
    order = rng.permutation(len(lesions))
    order = sorted(order, key=lambda i: -len(lesions[i]))  # stable: keeps the shuffle within a size
    total_images = sum(len(indices) for indices in lesions)
    targets = {key: fraction * total_images for key, fraction in fractions.items() if fraction > 0}
    filled = dict.fromkeys(targets, 0)
    assigned: dict[str, list[int]] = {key: [] for key in fractions}
    for i in order:
        key = max(targets, key=lambda k: (targets[k] - filled[k]) / targets[k])  # ties: first in SPLIT_KEYS
        assigned[key] += lesions[i]
        filled[key] += len(lesions[i])
    return assigned


# ---------------------------------------------------------------------------------------------
# Datalist file
# ---------------------------------------------------------------------------------------------


def write_datalist(splits: dict[str, list[dict]], path: str | os.PathLike, dataset_dir: str | os.PathLike) -> Path:
    """Write the Decathlon-style datalist JSON atomically, so a crash never leaves half a file.

    Image paths stay relative to ``dataset_dir`` (only its folder name is recorded, as ``name``),
    so the same datalist works wherever the dataset is mounted.
    """
    path = Path(path)
    content = {
        "name": f"HAM10000 ({Path(dataset_dir).resolve().name})",
        "labels": {str(index): name for index, name in enumerate(CLASS_NAMES)},
        "numTraining": len(splits.get("training", [])),
    }
    for key in SPLIT_KEYS:
        content[key] = [{field: item[field] for field in RECORD_KEYS} for item in splits.get(key, [])]
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1) + "\n"))
    return path


def load_datalist(path: str | os.PathLike, key: str, dataset_dir: str | os.PathLike | None = None) -> list[dict]:
    """Return the items of split ``key``; with ``dataset_dir``, ``image`` is joined onto it."""
    items = _split_items(_read_datalist(path), path, key)
    if not items:
        raise DatasetError(f"datalist {path}: split {key!r} is empty")
    if dataset_dir is None:
        return [dict(item) for item in items]
    return [{**item, "image": os.path.join(dataset_dir, item["image"])} for item in items]


def datalist_fingerprint(path: str | os.PathLike, keys: Sequence[str] = ("training", "validation")) -> str:
    """sha256 of the items of splits ``keys`` (what training trains and selects on), independent of the
    file's formatting and of its other splits."""
    content = _read_datalist(path)
    items = {key: content.get(key, []) for key in keys}
    return "sha256:" + hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def _read_datalist(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"datalist {path} does not exist; create it with scripts/prepare_data.py") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read datalist {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise DatasetError(f"datalist {path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise DatasetError(f"datalist {path} must hold a JSON object, not {type(content).__name__}")
    return content


def _split_items(content: dict, path: str | os.PathLike, key: str) -> list:
    if key not in content:
        present = [name for name, value in content.items() if isinstance(value, list)]
        raise DatasetError(f"datalist {path} has no split {key!r}; its splits are {present}")
    items = content[key]
    if not isinstance(items, list) or not all(isinstance(item, dict) and "image" in item for item in items):
        raise DatasetError(f"datalist {path}: split {key!r} must be a list of objects with an 'image' key")
    return items


# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------


def preflight(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    keys: Sequence[str] = ("training", "validation"),
    labels: bool = True,
    memo_dir: str | os.PathLike | None = None,
) -> None:
    """Check every item of the ``keys`` splits before any work; raise one ``DatasetError`` listing all.

    Per item: the image path is relative and, once resolved (symlinks followed), stays inside
    ``dataset_dir``; the file exists and decodes to RGB; with ``labels``, the label is an integer
    class index (batch inference passes False: its images need none). Each split must exist and be
    non-empty.

    With ``memo_dir`` (training passes its ``cache_dir``) a passed decode check leaves a memo there,
    named by a hash of every checked file's path, size and modification time (the identity the image
    cache's name uses too); a later preflight of the same unchanged files skips decoding them again,
    the slowest part of a run's start. Paths and labels are checked every time.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset_dir {dataset_dir} is not a directory")
    root = dataset_dir.resolve()
    content = _read_datalist(datalist)
    problems: list[str] = []
    to_decode: list[tuple[str, Path]] = []  # (problem prefix, file)
    for key in keys:
        try:
            items = _split_items(content, datalist, key)
        except DatasetError as error:
            problems.append(f"{key}: {error}")
            continue
        if not items:
            problems.append(f"{key}: split is empty")
        for index, item in enumerate(items):
            prefix = f"{key}[{index}] {item['image']}"
            item_problems = _item_problems(item, labels)
            if _is_safe_relative(item["image"]):
                # the text can stay inside while a symlink on the way leads out: check where it really is
                resolved = (dataset_dir / item["image"]).resolve()
                if resolved.is_relative_to(root):
                    to_decode.append((prefix, dataset_dir / item["image"]))
                else:
                    item_problems.append(f"resolves to {resolved}, outside dataset_dir {root}")
            problems += [f"{prefix}: {reason}" for reason in item_problems]
    memo = None if problems or memo_dir is None else _decode_memo(memo_dir, [file for _, file in to_decode])
    if memo is not None and memo.is_file():
        logger.info("preflight: %d images OK (decoded unchanged before, memo %s)", len(to_decode), memo)
        return
    problems += _decode_problems(to_decode)
    if problems:
        raise _listing(
            f"preflight found {len(problems)} problem(s) in datalist {datalist} (dataset_dir {dataset_dir})", problems
        )
    logger.info("preflight: %d images OK", len(to_decode))
    if memo is not None:
        atomic_write(memo, lambda tmp: Path(tmp).write_text(f"{len(to_decode)} images decoded\n"))


def _listing(headline: str, problems: list[str]) -> DatasetError:
    shown = problems[:MAX_REPORTED]
    if len(problems) > MAX_REPORTED:
        shown.append(f"... and {len(problems) - MAX_REPORTED} more")
    return DatasetError(f"{headline}:\n  " + "\n  ".join(shown))


def _decode_memo(memo_dir: str | os.PathLike, files: list[Path]) -> Path | None:
    """The memo of a passed decode check of exactly ``files`` as they are now (None when one is missing:
    the decode check reports it)."""
    digest = hashlib.sha256()
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            return None
        digest.update(f"{file}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}\n".encode())
    return Path(memo_dir) / f"preflight-{digest.hexdigest()[:20]}.ok"


def _item_problems(item: dict, labels: bool = True) -> list[str]:
    problems = []
    if not _is_safe_relative(item["image"]):
        problems.append("image path must be relative to dataset_dir, without '..'")
    if not labels:
        return problems
    label = item.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        problems.append(f"label {label!r} is not an integer")
    elif not 0 <= label < NUM_CLASSES:
        problems.append(f"label {label} is outside 0..{NUM_CLASSES - 1}")
    return problems


def _is_safe_relative(image: object) -> bool:
    """True for a relative path with no '..' part, on POSIX or Windows spelling."""
    if not isinstance(image, str) or not image:
        return False
    for pure in (PurePosixPath(image), PureWindowsPath(image)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            return False
    return True


def _decode_problems(to_decode: list[tuple[str, Path]]) -> list[str]:
    """Decode all files in threads (Pillow releases the GIL while decoding)."""
    with warnings.catch_warnings():
        # decode_problem reports oversized images itself; keep Pillow's warning from repeating it.
        warnings.simplefilter("ignore", category=Image.DecompressionBombWarning)
        with ThreadPoolExecutor() as pool:
            reasons = list(
                tqdm(
                    pool.map(decode_problem, [file for _, file in to_decode]),
                    total=len(to_decode),
                    desc="preflight",
                    unit="img",
                )
            )
    return [f"{prefix}: {reason}" for (prefix, _), reason in zip(to_decode, reasons, strict=True) if reason]


# ---------------------------------------------------------------------------------------------
# What evaluation and inference read
# ---------------------------------------------------------------------------------------------


def evaluation_split(datalist: str | os.PathLike) -> str:
    """The split a final evaluation reads: ``testing`` when it has items, else ``validation``."""
    return "testing" if _read_datalist(datalist).get("testing") else "validation"


def inference_items(source: str | os.PathLike, dataset_dir: str | os.PathLike, split: str = "testing") -> list[dict]:
    """The images to classify: every image under folder ``source``, or split ``split`` of datalist ``source``."""
    path = Path(source)
    if path.is_dir():
        images = image_files(path)
        problems = _decode_problems([(str(file.relative_to(path)), file) for file in images])
        if problems:  # found before any work, so that a run does not end on them having classified nothing
            raise _listing(
                f"input folder {path}: {len(problems)} of {len(images)} images cannot be classified", problems
            )
        return [{"image": str(file)} for file in images]
    if path.suffix == ".json":
        preflight(path, dataset_dir, keys=[split], labels=False)  # the same checks as training and evaluation
        return load_datalist(path, split, dataset_dir)
    raise DatasetError(f"config key 'input' must be a folder of images or a datalist .json, got {path}")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder``, sorted, but hidden ones and those of archive tools' side folders."""
    folder = Path(folder)
    images = sorted(
        file
        for file in folder.rglob("*")
        if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file() and not _hidden(file.relative_to(folder))
    )
    if not images:
        raise DatasetError(f"folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return images


def _hidden(relative: Path) -> bool:
    """Hidden files and folders, and what archive tools leave beside the files (macOS ``__MACOSX/``, ``._*``)."""
    return any(part.startswith((".", "__MACOSX")) for part in relative.parts)


def require_file(path: str | os.PathLike, key: str) -> None:
    """Fail before any work when the file that config key ``key`` names is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config key {key!r} names {path}, which does not exist (train first, or pass --{key})")
