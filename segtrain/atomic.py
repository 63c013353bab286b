"""Writing a file atomically: a temporary file in the same folder, then a rename.

``os.replace`` is atomic on POSIX, so a crash mid-write leaves the previous file (or none)
in place, never half of the new one. Checkpoints, caches and predictions all go through here.

A full disk is one error, ``NoSpaceLeft`` (an ``OSError``, errno ENOSPC): "no space left on <folder>
(<free> free, ~<size> needed)", raised before anything is written when the caller knows the size
(``size_hint``), else when the write fails: as Python's ENOSPC, or as torch's writer reports a short
write ("enforce fail at inline_container.cc ... unexpected pos"). The temporary file is removed first,
so the space it took is free again for the log line that reports it.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Torch's zip writer reports a short write (a full disk) this way, with no errno.
_TORCH_SHORT_WRITE = "unexpected pos"


class NoSpaceLeft(OSError):
    """The folder's file system is full (or the user's quota spent)."""

    def __init__(self, folder: Path, needed: int | None) -> None:
        free = _free_bytes(folder)
        size = f", ~{_human(needed)} needed" if needed else ""
        super().__init__(errno.ENOSPC, f"no space left on {folder} ({_human(free)} free{size}); files written "
                                       "before are intact")
        self.folder, self.needed = folder, needed

    def __str__(self) -> str:
        return self.strerror


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_full(err: BaseException, tmp: Path, size_hint: int | None) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or torch's short write while the folder has less free
    than the rest of the file (a short write on a folder with room is another failure, reported as it is)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not (isinstance(err, RuntimeError) and _TORCH_SHORT_WRITE in str(err)):
        return False
    free = _free_bytes(tmp.parent)
    written = tmp.stat().st_size if tmp.exists() else 0
    return free is not None and free < max((size_hint or 0) - written, 1 << 20)


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = False,
                 size_hint: int | None = None) -> Path:
    """``write(tmp)`` fills a temporary file, which then replaces ``path``; removed on any failure.

    The file gets the usual permissions (0666 less the umask), not the temporary file's 0600.
    ``fsync`` flushes it to disk before the rename (for checkpoints). ``size_hint``: about how many bytes
    ``write`` will write; a folder with less free space is refused before anything is written.
    The temporary name keeps the suffix (``.best.pt.x1y2.tmp.pt``): some writers check it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size_hint is not None and (free := _free_bytes(path.parent)) is not None and free < size_hint:
        raise NoSpaceLeft(path.parent, size_hint)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _is_full(err, tmp, size_hint)
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if full:
            raise NoSpaceLeft(path.parent, size_hint or written) from err
        raise
    return path


def atomic_write_serialized(path: str | Path, serialize: Callable[[BinaryIO], None], fsync: bool = False) -> Path:
    """``serialize(buffer)`` into memory, then the bytes written atomically: for writers whose own file handling
    cannot fail cleanly (torch.export's archive writer aborts the process at exit after a failed write)."""
    buffer = io.BytesIO()
    serialize(buffer)
    data = buffer.getbuffer()
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync, size_hint=len(data))
