"""Package the trained bundle as a TorchServe model archive (``dist/skin_lesion.mar``).

    python scripts/package_mar.py [--bundle_root .] [--weights models/model.pt] [--export_path dist]
        [--batch_size 8 --max_batch_delay_ms 1 --min_workers 1 --max_workers 1 --response_timeout_s 60]

What the archive holds: ``handler/mar.py``.
"""

import sys

import fire

from bundle.predictor import MAX_PIXELS
from handler.mar import ArchiveError, write_mar


def package(
    bundle_root: str = ".",
    weights: str | None = None,
    export_path: str = "dist",
    version: str = "1.0",
    batch_size: int = 8,
    max_batch_delay_ms: int = 1,
    min_workers: int = 1,
    max_workers: int = 1,
    response_timeout_s: int = 60,
    max_retry_timeout_s: int = 30,
    max_pixels: int = MAX_PIXELS,
) -> None:
    """Write ``<export_path>/skin_lesion.mar``, replacing it (options: ``handler.mar.write_mar``)."""
    try:
        mar = write_mar(
            bundle_root,
            weights,
            export_path,
            version,
            batch_size,
            max_batch_delay_ms,
            min_workers,
            max_workers,
            response_timeout_s,
            max_retry_timeout_s,
            max_pixels,
        )
    except (FileNotFoundError, ValueError, ArchiveError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB): batch {batch_size}, workers {min_workers}-{max_workers}")


if __name__ == "__main__":
    fire.Fire(package)
