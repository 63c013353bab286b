"""One training at a time per run directory: a lock file, ``<run dir>/.segtrain.lock``, held while a run writes there.

Two trainings in one ``hydra.run.dir`` (or ``trainer.resume=auto`` while the first still runs) would leave the
directory mixed: last.pt of one, metrics.json of the other. The lock is an ``flock`` on the file, which the
kernel releases when its holder exits, however it exits; the file names its holder (pid, host, start), so a
refusal says who holds it, and a lock left by a process that died is taken over with a warning that names it.

    with run_lock(run_dir):      # RunDirLocked when another process holds it
        ...

Taken twice in one process (``train.RunStart`` before Hydra writes anything in the directory, then ``train``)
it is held once. Under torchrun only rank 0 takes it (the callers see to it): the ranks share the directory.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = ".segtrain.lock"
_held: dict[Path, list[int]] = {}  # resolved run dir -> [fd, depth]


class RunDirLocked(RuntimeError):
    """Another process is training in this run directory."""


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now().isoformat(timespec='seconds')}"


def acquire(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that wrote no name"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise RunDirLocked(f"{run_dir}: another training is writing there ({holder}; lock {path}); wait for it "
                               "to end, or give this run another hydra.run.dir") from None
        log.warning("%s: cannot be locked (%s): a second training in this directory would not be stopped", path, err)
        return
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:  # written by a holder that did not release it: a process that died
        log.warning("%s: taking over the lock of %s, which is no longer running", path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_text().encode(), 0)
    _held[key] = [fd, 1]


def release(run_dir: Path) -> None:
    key = Path(run_dir).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1]:
        return
    fd = entry[0]
    del _held[key]
    # Emptied, not removed: a removed lock file lets a third process lock a fresh inode while a second still
    # holds the old one. An empty file reads as released.
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
