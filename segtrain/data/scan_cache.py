"""Where the class-count pass of ``segtrain.data.scan`` is cached, its key, and the file itself.

The folder: ``dataset.cache_dir`` when set (``counts_cache_in`` makes the config's value the default of the pass),
else ``<root>/.segtrain/``; a root that cannot be written (a shared, read-only dataset) falls back to the user's
cache, ``$XDG_CACHE_HOME/segtrain/`` (else ``~/.cache/segtrain/``), in a folder named by the root's resolved path so
that two datasets never share one, and says so once in the log. A cache already in a read-only root's
``.segtrain/`` (written by whoever could) is still read there.

The file, ``class_counts-<fingerprint>.npz``, holds the (N, C) matrix, the (N,) ignored and all pixels of each pair
(``SplitCounts``) and the whole fingerprint: the mask and image files (relative path, size, mtime_ns, ctime_ns) and
every argument that changes the counts, hashed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segtrain.atomic import atomic_write

log = logging.getLogger("segtrain.data.scan")

# Bumped whenever the counting rules or the file layout change, so old caches are not reused.
CACHE_VERSION = 4  # 4: the ignored and all pixels of each pair beside the matrix
# dataset.cache_dir of the command running: the pass is reached through code that takes no config
# (build.data.split_counts), so the entry points set it around their data set-up.
_configured: ContextVar[str | None] = ContextVar("segtrain_cache_dir", default=None)
_announced: set[tuple[str, str]] = set()  # (root, fallback folder) already logged


@dataclass
class SplitCounts:
    """The pass over a split: ``counts`` (N, C) int64 pixels of each class in each pair, ``ignored`` and ``pixels``
    (N,) int64 its ignored and all its pixels."""

    counts: np.ndarray
    ignored: np.ndarray
    pixels: np.ndarray


@contextmanager
def counts_cache_in(folder: str | Path | None) -> Iterator[None]:
    """``dataset.cache_dir`` as the default folder of every cache look-up inside (None: beside the dataset)."""
    token = _configured.set(None if folder is None else str(folder))
    try:
        yield
    finally:
        _configured.reset(token)


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/segtrain``, else ``~/.cache/segtrain``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segtrain"


def writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (or ``folder`` made, when it is missing)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def cache_folder(root: str | Path, cache_dir: str | Path | None = None, name: str | None = None) -> Path:
    """The folder of the cache of a dataset at ``root``: ``cache_dir`` (default: ``counts_cache_in``'s), else
    ``<root>/.segtrain/``, else (root not writable, and no file ``name`` there already) the user's cache."""
    cache_dir = _configured.get() if cache_dir is None else cache_dir
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    own = Path(root) / ".segtrain"
    if writable(own) or (name is not None and (own / name).is_file()):
        return own
    resolved = Path(root).expanduser().resolve()
    fallback = user_cache_dir() / f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"
    if (str(resolved), str(fallback)) not in _announced:
        _announced.add((str(resolved), str(fallback)))
        log.info("%s cannot be written: the class-count cache goes to %s (dataset.cache_dir sets another folder)",
                 root, fallback)
    return fallback


def _canonical(value: Any) -> Any:
    """JSON-able form of a label mapping that is equal for equal mappings, whatever their order."""
    if isinstance(value, Mapping):
        pairs = [(_canonical(k), _canonical(v)) for k, v in value.items()]
        return sorted(([k, v] for k, v in pairs), key=lambda kv: json.dumps(kv[0], sort_keys=True))
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _file_entries(paths: Iterable[Path], root: Path, what: str) -> list[list]:
    entries = []
    for path in map(Path, paths):
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: {what} file listed by the dataset does not exist") from None
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:  # files outside the root: the absolute path still identifies them
            name = path.resolve().as_posix()
        entries.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return entries


def fingerprint(source: Any, num_classes: int, ignore_index: int | None) -> str:
    root = Path(source.root)
    key = {
        "version": CACHE_VERSION,
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "label_mapping": _canonical(getattr(source, "label_mapping", None)),
        "on_bad_label": getattr(getattr(source, "decoder", None), "on_bad_label", "error"),
        # In pair order: a row of the matrix belongs to one pair.
        "masks": _file_entries(source.mask_files() if hasattr(source, "mask_files") else source.mask_paths, root,
                               "mask"),
        "images": _file_entries(getattr(source, "image_paths", None) or [], root, "image"),
    }
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()


def cache_file(source: Any, num_classes: int, ignore_index: int | None,
               cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """(cache file, fingerprint) of a mask source: every listed file is stat-ed once, no mask is read."""
    key = fingerprint(source, num_classes, ignore_index)
    name = f"class_counts-{key[:16]}.npz"
    return cache_folder(source.root, cache_dir, name) / name, key


def read_cache(path: Path, key: str, num_pairs: int, num_classes: int) -> SplitCounts | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != key:
                raise ValueError("fingerprint does not match")
            split = SplitCounts(*(data[k].astype(np.int64, copy=False) for k in ("counts", "ignored", "pixels")))
        shapes = (split.counts.shape, split.ignored.shape, split.pixels.shape)
        if shapes != ((num_pairs, num_classes), (num_pairs,), (num_pairs,)):
            raise ValueError(f"shapes {shapes}, expected {((num_pairs, num_classes), (num_pairs,), (num_pairs,))}")
    except (OSError, ValueError, KeyError, EOFError) as err:
        log.warning("%s: ignoring unreadable class-count cache (%s); recomputing", path, err)
        return None
    return split


def write_cache(path: Path, key: str, split: SplitCounts) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, counts=split.counts, ignored=split.ignored, pixels=split.pixels, fingerprint=np.array(key))

    try:  # a unique temporary file: a cache is never seen half-written
        atomic_write(path, write)
    except OSError as err:  # a read-only dataset must not stop training
        log.warning("%s: could not write the class-count cache (%s)", path, err)
