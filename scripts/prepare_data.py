"""Split a HAM10000 folder by lesion and write the datalist the configs read.

    python scripts/prepare_data.py --dataset_dir D --output data/datalist.json \
        [--seed 0 --val_frac 0.15 --test_frac 0.15]
"""

import sys

import fire

from bundle.data import SPLIT_KEYS, read_ham10000, split_by_lesion, write_datalist
from bundle.labels import CLASS_NAMES


def main(dataset_dir: str, output: str, seed: int = 0, val_frac: float = 0.15, test_frac: float = 0.15) -> None:
    """Read ``dataset_dir``, split it by lesion, write the datalist to ``output`` and print the counts."""
    try:
        records = read_ham10000(dataset_dir)
        splits = split_by_lesion(records, val_frac=val_frac, test_frac=test_frac, seed=seed)
    except ValueError as error:  # DatasetError, or fractions out of range
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    path = write_datalist(splits, output, dataset_dir)
    print(f"wrote {path}: {len(records)} images, seed {seed}")
    print(count_table(splits))


def count_table(splits: dict) -> str:
    """Images per class and split (with the class's share of the split), then lesion and image totals."""
    columns = [key for key in SPLIT_KEYS if splits[key]]
    lines = [f"{'class':<8}" + "".join(f"{key:>18}" for key in columns)]
    for label, name in enumerate(CLASS_NAMES):
        cells = []
        for key in columns:
            count = sum(item["label"] == label for item in splits[key])
            cells.append(f"{count:>10} ({100 * count / len(splits[key]):4.1f}%)")
        lines.append(f"{name:<8}" + "".join(cells))
    total = sum(len(splits[key]) for key in columns)
    sizes = [len(splits[key]) for key in columns]
    lines.append(f"{'images':<8}" + "".join(f"{size:>10} ({100 * size / total:4.1f}%)" for size in sizes))
    lesions = {key: len({item["lesion_id"] for item in splits[key]}) for key in columns}
    lines.append(f"{'lesions':<8}" + "".join(f"{lesions[key]:>18}" for key in columns))
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
