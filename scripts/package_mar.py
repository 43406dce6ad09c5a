"""Package the trained bundle as a TorchServe model archive (``dist/skin_lesion.mar``).

    python scripts/package_mar.py [--bundle_root .] [--weights models/model.pt] [--export_path dist]
        [--batch_size 8 --max_batch_delay_ms 1 --min_workers 1 --max_workers 1 --response_timeout_s 60]

What the archive holds: ``handler/mar.py``.
"""

import functools
import sys

import fire

from handler.mar import ArchiveError, write_mar


@functools.wraps(write_mar)  # its options and their help, for fire
def package(*args, **options) -> None:
    try:
        mar = write_mar(*args, **options)
    except (FileNotFoundError, ValueError, ArchiveError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    fire.Fire(package)
