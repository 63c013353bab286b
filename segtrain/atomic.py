"""Writing a file atomically: a temporary file in the same folder, then a rename.

``os.replace`` is atomic on POSIX, so a crash mid-write leaves the previous file (or none)
in place, never half of the new one. Checkpoints, caches and predictions all go through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """``write(tmp)`` fills a temporary file, which then replaces ``path``; removed on any failure.

    The file gets the usual permissions (0666 less the umask), not the temporary file's 0600.
    ``fsync`` flushes it to disk before the rename (for checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
