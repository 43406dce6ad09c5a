"""Atomic file replacement: readers (and a killed run's successor) never see half a file."""

import os
import re
from pathlib import Path

_TEMPORARY = re.compile(r"\..+\.tmp(\d+)")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)``, then move the result over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed processes left in ``folder`` (a kill ends ``atomic_write`` before
    its cleanup; a checkpoint's is the checkpoint's size, and SageMaker syncs it to S3 and back); return them."""
    removed = []
    for path in Path(folder).glob(".*.tmp*"):
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
