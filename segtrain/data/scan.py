"""One pass over the pairs of a split: per-image class counts, every file checked, one cache.

Each pair is read once: the mask is decoded (label mapping applied) and counted, the image is
decoded as training will read it (a truncated, changed or 16-bit file stops here) and its size
compared with the mask's, and labels outside the classes are found. The result is an (N, C) int64 matrix, the pixels of
each class in each image; the class statistics (``ClassStats.from_counts``), the repeat
factors of repeat-factor sampling and the rare-class crop frequencies all derive from it.

Training stops at the first problem, before its first step; ``check_split`` (for
``scripts/check_dataset.py``) runs the same per-pair routine and collects every problem.
Decoding is the slow part, so ``num_workers > 0`` runs the routine in DataLoader workers and
only a (C,) vector per pair crosses process boundaries; under DDP ``segtrain.data.scan_ranks``
gives each rank a share of the pairs and combines the rows.

Beside the matrix the pass keeps two (N,) vectors, each pair's ignored pixels (``ignore_index``; with
``on_bad_label=ignore`` also the labels outside the classes, which training ignores too; a multi-label folder of
binary masks: the pixels ignored in every channel) and all its pixels (``SplitCounts``): the (N, C) matrix stays
what every user of the counts takes.

The counts are cached under ``<root>/.segtrain/``, or ``dataset.cache_dir`` when set; a root that cannot be written
(a shared, read-only dataset) falls back to the user's cache (``segtrain.data.scan_cache``). The file is keyed by a
fingerprint of the mask and image files (relative path, size, mtime_ns and ctime_ns: a file rewritten with its old
size and mtime restored, as ``cp -p`` or a repair tool leaves it, has a new ctime) and of every argument that
changes the counts. A pass that met a problem caches nothing, so a cache hit also means that every pair was fine.

A *mask source* is a FolderDataset, or any object with ``root``, ``mask_paths`` and
``load_mask(index)`` (optionally ``image_paths``, ``check_image(index)`` when its images are read by windows,
``label_mapping``, ``mask_files()`` when a mask is several files, and a ``decoder`` whose ``count`` counts its own
way: the multi-label decoders of ``segtrain.data.multilabel``).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain.data.folder import check_image, size_mismatch_error
from segtrain.data.masks import bad_label_message, count_labels
from segtrain.data.multilabel import BinaryMaskDecoder, fill_code
from segtrain.data.scan_cache import SplitCounts, cache_file, read_cache, write_cache

log = logging.getLogger(__name__)


@dataclass
class PairScan:
    counts: np.ndarray | None  # (C,) pixels of each class; None when the pair has a problem
    problems: list[Exception]  # each names its file
    ignored: int = 0  # pixels training ignores (see the module docstring)
    pixels: int = 0  # all the mask's pixels


def _ignored_pixels(decoder: Any, mask: np.ndarray, ignore_index: int | None, bad: list[tuple[int, int]]) -> int:
    if isinstance(decoder, BinaryMaskDecoder):  # codes, not labels: the pixels ignored in every channel
        every = fill_code(decoder.channels)
        return int(np.count_nonzero((mask & every) == every))
    ignored = int(np.count_nonzero(mask == ignore_index)) if ignore_index is not None else 0
    return ignored + (sum(n for _, n in bad) if getattr(decoder, "on_bad_label", "error") == "ignore" else 0)


def _read_labels(source: Any, index: int) -> np.ndarray:
    decoder = getattr(source, "decoder", None)
    if decoder is not None:  # a dataset: mapped labels, before the label check (done here)
        return decoder.decode(source.mask_paths[index])
    return np.asarray(source.load_mask(index))


def scan_pair(source: Any, index: int, num_classes: int, ignore_index: int | None) -> PairScan:
    """The class counts of pair ``index`` and its problems: an unreadable image or mask, a mask
    whose size differs from its image's, labels outside the classes (unless the source's
    ``on_bad_label`` is ``ignore``)."""
    mask_path, problems = source.mask_paths[index], []
    image_paths = getattr(source, "image_paths", None)
    image_hw = None
    if image_paths is not None:
        try:
            # A source read by windows checks the window a sample reads, not the whole file (data.raster_tiles).
            image_hw = source.check_image(index) if hasattr(source, "check_image") else check_image(image_paths[index])
        except (OSError, ValueError) as err:
            problems.append(err)
    decoder = getattr(source, "decoder", None)
    # A multi-label decoder counts its own way: (2C,) positive and valid pixels per channel.
    count = getattr(decoder, "count", None) or (lambda m: count_labels(m, num_classes, ignore_index))
    try:
        mask = _read_labels(source, index)
        counts, bad = count(mask)
    except (OSError, ValueError) as err:
        return PairScan(None, problems + [err])
    except TypeError as err:  # not integer labels
        return PairScan(None, problems + [TypeError(f"{mask_path}: {err}")])
    if image_hw is not None and image_hw != mask.shape:
        problems.append(size_mismatch_error(mask_path, mask.shape, image_paths[index], image_hw))
    if bad and getattr(decoder, "on_bad_label", "error") == "error":
        labels = getattr(decoder, "num_labels", num_classes)  # a region decoder checks the labels of its regions
        problems.append(ValueError(bad_label_message(mask_path, bad, labels, ignore_index)))
    if problems:
        return PairScan(None, problems)
    return PairScan(counts, problems, _ignored_pixels(decoder, np.asarray(mask), ignore_index, bad), int(mask.size))


class _PairScans(torch.utils.data.Dataset):
    """``scan_pair`` in a DataLoader worker: only the small result is sent back."""

    def __init__(self, source: Any, num_classes: int, ignore_index: int | None, indices: Sequence[int]) -> None:
        self.source, self.num_classes, self.ignore_index, self.indices = source, num_classes, ignore_index, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> PairScan:
        return scan_pair(self.source, self.indices[position], self.num_classes, self.ignore_index)


def _keep_as_is(item: Any) -> Any:
    # Module-level (not a lambda) so that spawn/forkserver workers can pickle it.
    return item


def iter_scans(source: Any, num_classes: int, ignore_index: int | None, num_workers: int = 0,
               indices: Sequence[int] | None = None) -> Iterator[PairScan]:
    """``scan_pair`` of every pair (or of the pairs at ``indices``: one DDP rank's share), in order."""
    scans = _PairScans(source, num_classes, ignore_index, range(len(source.mask_paths)) if indices is None else indices)
    if num_workers == 0:
        yield from (scans[i] for i in range(len(scans)))
        return
    # The loader's iterator lives only in this frame, so closing this generator ends the
    # workers at once instead of whenever a traceback holding it is collected.
    yield from torch.utils.data.DataLoader(scans, batch_size=None, shuffle=False, num_workers=num_workers,
                                           collate_fn=_keep_as_is)


def as_int(name: str, value: Any, minimum: int) -> int:
    try:
        number = operator.index(value)  # accepts numpy integers, refuses 2.0 and "2"
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return number


def is_mask_source(source: Any) -> bool:
    return all(hasattr(source, name) for name in ("mask_paths", "root")) and (
        hasattr(source, "decoder") or hasattr(source, "load_mask"))


def counts_cache_file(source: Any, num_classes: int, ignore_index: int | None = 255,
                      cache_dir: str | Path | None = None) -> Path:
    """The file in which ``image_class_counts`` caches the counts of ``source`` (it may not exist);
    ``cache_dir``: ``dataset.cache_dir`` (``scan_cache.cache_folder``)."""
    return lookup_cache(source, num_classes, ignore_index, cache_dir, read=False)[0]


def lookup_cache(source: Any, num_classes: int, ignore_index: int | None, cache_dir: str | Path | None = None,
                 read: bool = True) -> tuple[Path, str, SplitCounts | None]:
    """(cache file, fingerprint, the cached counts or None on a miss); no mask is read."""
    if not is_mask_source(source):
        raise TypeError(f"the class-count cache needs a mask source (root, mask_paths, load_mask), "
                        f"got {type(source).__name__}")
    num_classes = as_int("num_classes", num_classes, 1)
    path, key = cache_file(source, num_classes, ignore_index, cache_dir)
    return path, key, read_cache(path, key, len(source.mask_paths), num_classes) if read else None


def read_cached_counts(source: Any, num_classes: int, ignore_index: int | None = 255,
                       cache_dir: str | Path | None = None) -> np.ndarray | None:
    """The matrix ``image_class_counts`` would read from its cache, or None on a miss (no mask read)."""
    cached = lookup_cache(source, num_classes, ignore_index, cache_dir)[2]
    return None if cached is None else cached.counts


def scan_counts(source: Any, num_classes: int, ignore_index: int | None, num_workers: int = 0,
                indices: Sequence[int] | None = None) -> SplitCounts:
    """The counts of the pairs at ``indices`` (default: every pair), in order, no cache.

    Raises the first problem found (the error names the file); see ``scan_pair``.
    """
    rows, ignored, pixels = [], [], []
    scans = iter_scans(source, num_classes, ignore_index, num_workers, indices)
    for scan in scans:
        if scan.problems:
            scans.close()  # stop DataLoader workers before raising
            raise scan.problems[0]
        rows.append(scan.counts)
        ignored.append(scan.ignored)
        pixels.append(scan.pixels)
    counts = np.stack(rows).astype(np.int64, copy=False) if rows else np.zeros((0, num_classes), dtype=np.int64)
    return SplitCounts(counts, np.array(ignored, dtype=np.int64), np.array(pixels, dtype=np.int64))


def image_pixel_counts(source: Any, num_classes: int, ignore_index: int | None = 255, num_workers: int = 0,
                       cache: bool = True, cache_dir: str | Path | None = None) -> SplitCounts:
    """The pass over every pair of the mask source, every pair checked, in this process (``segtrain.data.scan_ranks``
    spreads the same pass over DDP ranks), read from the cache when it is there, else written to it.

    Raises the first problem found (the error names the file); see ``scan_pair``.
    """
    num_classes, num_workers = as_int("num_classes", num_classes, 1), as_int("num_workers", num_workers, 0)
    path, key, split = lookup_cache(source, num_classes, ignore_index, cache_dir) if cache else (None, None, None)
    if split is not None:
        log.info("class counts of %d masks read from %s", len(split.counts), path)
        return split
    log.info("reading %d masks: class counts and pair checks", len(source.mask_paths))
    split = scan_counts(source, num_classes, ignore_index, num_workers)
    if path is not None:
        write_cache(path, key, split)
    return split


def image_class_counts(source: Any, num_classes: int, ignore_index: int | None = 255, num_workers: int = 0,
                       cache: bool = True, cache_dir: str | Path | None = None) -> np.ndarray:
    """(N, C) int64: pixels of each class in each pair of the mask source (``image_pixel_counts``)."""
    return image_pixel_counts(source, num_classes, ignore_index, num_workers, cache, cache_dir).counts
