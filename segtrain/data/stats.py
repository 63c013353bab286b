"""Per-class pixel and image statistics of a training split, with an on-disk cache.

One pass over the raw training masks (label mapping applied, no augmentation) gives
everything the class-weight strategies in ``segtrain.weights`` need. Augmentation is left
out on purpose: random crops and flips change the counts from epoch to epoch, and the
weights must describe the data, not one draw of the augmentation.

Decoding thousands of PNG masks is the slow part, so ``num_workers > 0`` decodes and counts
in DataLoader workers; only a (C,) count vector per mask crosses process boundaries. The
result is cached as JSON under ``<root>/.segtrain/`` keyed by a fingerprint of the mask
files (relative path, size, mtime_ns) and of every argument that changes the counts, so a
second run with the same data reads no mask at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# Bumped whenever the counting rules or the JSON layout change, so old caches are not reused.
_CACHE_VERSION = 1
# Above this label value np.bincount would allocate a large histogram; np.unique is used instead.
_BINCOUNT_LIMIT = 1 << 16


@dataclass(eq=False)
class ClassStats:
    """Counts over a training split; every array is int64 of shape (num_classes,).

    pixel_count[c]          pixels labelled c
    image_count[c]          images containing at least one pixel of c
    present_pixel_count[c]  valid (non-ignored) pixels of the images that contain c
    total_pixels            valid pixels overall (== pixel_count.sum())
    num_images              masks counted, including any that are entirely ignored
    """

    pixel_count: np.ndarray
    image_count: np.ndarray
    present_pixel_count: np.ndarray
    total_pixels: int
    num_images: int

    def __post_init__(self) -> None:
        for name in ("pixel_count", "image_count", "present_pixel_count"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1 or (value.size and (value < 0).any()):
                raise ValueError(f"ClassStats.{name} must be a 1-D array of counts >= 0, got {value!r}")
            setattr(self, name, value.astype(np.int64))
        sizes = {"pixel_count": self.pixel_count.size, "image_count": self.image_count.size}
        sizes["present_pixel_count"] = self.present_pixel_count.size
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ClassStats arrays differ in length: {sizes}")
        self.total_pixels = int(self.total_pixels)
        self.num_images = int(self.num_images)

    @property
    def num_classes(self) -> int:
        return int(self.pixel_count.size)

    @property
    def frequency(self) -> np.ndarray:
        """Share of all valid pixels labelled c (float64; zeros when nothing is labelled)."""
        return _safe_ratio(self.pixel_count, np.full(self.num_classes, self.total_pixels))

    @property
    def present_frequency(self) -> np.ndarray:
        """freq[c] = pixel_count[c] / present_pixel_count[c], as in median frequency balancing.

        Dividing by the pixels of the images that contain c (not by all pixels) keeps a class
        that is large where it occurs but occurs in few images from looking rare.
        Absent classes get 0.
        """
        return _safe_ratio(self.pixel_count, self.present_pixel_count)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClassStats):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """Plain ints and lists of ints, so JSON keeps every count exactly."""
        values = {key: getattr(self, key) for key in self.__dataclass_fields__}
        return {key: v.tolist() if isinstance(v, np.ndarray) else v for key, v in values.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassStats:
        missing = [key for key in cls.__dataclass_fields__ if key not in data]
        if missing:
            raise ValueError(f"ClassStats.from_dict: missing keys {missing}; got {sorted(data)}")
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})

    def to_json(self, path: str | os.PathLike) -> None:
        _write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ClassStats:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as err:  # json.JSONDecodeError is a ValueError too
            raise ValueError(f"{path}: not a ClassStats JSON file: {err}") from err


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(num.shape, dtype=np.float64)
    return np.divide(num, den, out=out, where=den > 0, dtype=np.float64)


def count_mask(mask: Any, num_classes: int, ignore_index: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Return (per-class pixel counts, [(bad label, pixel count), ...]) of one mask."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    flat = np.asarray(mask).ravel()
    if flat.dtype.kind not in "iu":
        raise TypeError(f"masks must hold integer labels, got dtype {flat.dtype}")
    if flat.dtype == np.uint64:  # np.bincount refuses uint64; labels never need that range
        flat = flat.astype(np.int64)
    counts = np.zeros(num_classes, dtype=np.int64)
    if flat.size == 0:
        return counts, []
    lo, hi = int(flat.min()), int(flat.max())
    if lo >= 0 and hi < _BINCOUNT_LIMIT:
        hist = np.bincount(flat, minlength=num_classes)
        values = np.flatnonzero(hist)
        value_counts = hist[values]
    else:
        values, value_counts = np.unique(flat.astype(np.int64), return_counts=True)
    bad = []
    for value, n in zip(values.tolist(), value_counts.tolist()):
        if 0 <= value < num_classes:
            counts[value] = n
        elif value != ignore_index:
            bad.append((value, n))
    return counts, bad


def _bad_label_message(where: str, bad: list[tuple[int, int]], num_classes: int, ignore_index: int) -> str:
    found = ", ".join(f"value {value} ({n} px)" for value, n in bad)
    return f"{where}: labels outside [0, {num_classes}) and != ignore_index {ignore_index}: {found}"


class _MaskCounts(torch.utils.data.Dataset):
    """Counts in the worker so that only a (C,) vector, not the decoded mask, is sent back."""

    def __init__(self, source: Any, num_classes: int, ignore_index: int) -> None:
        self.source = source
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.source.mask_paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, list[tuple[int, int]]]:
        try:
            counts, bad = count_mask(self.source.load_mask(index), self.num_classes, self.ignore_index)
        except TypeError as err:
            raise TypeError(f"{self.source.mask_paths[index]}: {err}") from None
        return index, counts, bad


def _keep_as_is(item: Any) -> Any:
    # Module-level (not a lambda) so that spawn/forkserver workers can pickle it.
    return item


def _iter_source_counts(source: Any, num_classes: int, ignore_index: int, num_workers: int):
    dataset = _MaskCounts(source, num_classes, ignore_index)
    if num_workers == 0:
        for index in range(len(dataset)):
            yield dataset[index]
        return
    # The loader's iterator lives only in this frame, so closing this generator ends the
    # workers at once instead of whenever a traceback holding it is collected.
    yield from torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_keep_as_is
    )


def _iter_plain_counts(masks: Iterable, num_classes: int, ignore_index: int):
    for index, mask in enumerate(masks):
        try:
            yield index, *count_mask(mask, num_classes, ignore_index)
        except TypeError as err:
            raise TypeError(f"mask item {index}: {err}") from None


def _accumulate(
    items: Generator, num_classes: int, ignore_index: int, describe: Callable[[int], str]
) -> ClassStats:
    """Sum per-mask counts; ``describe(index)`` names the mask in the bad-label error."""
    pixel = np.zeros(num_classes, dtype=np.int64)
    images = np.zeros(num_classes, dtype=np.int64)
    present_pixels = np.zeros(num_classes, dtype=np.int64)
    num_images = 0
    for index, counts, bad in items:
        if bad:
            items.close()  # stop DataLoader workers before raising
            raise ValueError(_bad_label_message(describe(index), bad, num_classes, ignore_index))
        present = counts > 0
        pixel += counts
        images += present
        present_pixels += present * counts.sum()
        num_images += 1
    return ClassStats(pixel, images, present_pixels, int(pixel.sum()), num_images)


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


def _fingerprint(source: Any, num_classes: int, ignore_index: int) -> str:
    root = Path(source.root)
    files = []
    for path in map(Path, source.mask_paths):
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: mask file listed by the dataset does not exist") from None
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:  # masks outside the root: the absolute path still identifies them
            name = path.resolve().as_posix()
        files.append([name, st.st_size, st.st_mtime_ns])
    files.sort()
    key = {
        "version": _CACHE_VERSION,
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "label_mapping": _canonical(getattr(source, "label_mapping", None)),
        "files": files,
    }
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()


def _cache_path(source: Any, fingerprint: str) -> Path:
    return Path(source.root) / ".segtrain" / f"class_stats-{fingerprint[:16]}.json"


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: several DDP ranks may write the same cache at once.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read_cache(path: Path, fingerprint: str, num_classes: int) -> ClassStats | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fingerprint:
            raise ValueError("fingerprint does not match")
        stats = ClassStats.from_dict(data["stats"])
        if stats.num_classes != num_classes:
            raise ValueError(f"{stats.num_classes} classes stored, {num_classes} expected")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: ignoring unreadable class statistics cache (%s); recomputing", path, err)
        return None
    return stats


def _as_int(name: str, value: Any, minimum: int) -> int:
    try:
        number = operator.index(value)  # accepts numpy integers, refuses 2.0 and "2"
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return number


def _is_mask_source(source: Any) -> bool:
    return all(hasattr(source, name) for name in ("mask_paths", "root", "load_mask"))


def _check_mask_source(source: Any) -> None:
    if not _is_mask_source(source):
        raise TypeError(f"the class statistics cache needs a mask source (mask_paths, root, load_mask), "
                        f"got {type(source).__name__}")


def class_stats_cache_file(source: Any, num_classes: int, ignore_index: int = 255) -> Path:
    """The JSON file in which ``compute_class_stats`` caches these statistics (it may not exist).

    Only the mask files' metadata is read, no mask.
    """
    _check_mask_source(source)
    num_classes = _as_int("num_classes", num_classes, 1)
    return _cache_path(source, _fingerprint(source, num_classes, ignore_index))


def read_cached_class_stats(source: Any, num_classes: int, ignore_index: int = 255) -> ClassStats | None:
    """The statistics ``compute_class_stats`` would read from its cache, or None on a miss.

    Lets a caller tell a cache hit from a fresh count (``python -m segtrain.stats`` says
    which it was) without decoding any mask.
    """
    _check_mask_source(source)
    num_classes = _as_int("num_classes", num_classes, 1)
    fingerprint = _fingerprint(source, num_classes, ignore_index)
    return _read_cache(_cache_path(source, fingerprint), fingerprint, num_classes)


def compute_class_stats(
    source: Any,
    num_classes: int,
    ignore_index: int = 255,
    num_workers: int = 0,
    cache: bool = True,
) -> ClassStats:
    """Count pixels and images per class over a training split.

    ``source`` is a mask source (``mask_paths``, ``root``, ``load_mask(i)``, optional
    ``label_mapping``), whose result is cached under ``<root>/.segtrain/`` and which can be
    decoded by ``num_workers`` DataLoader workers; or any iterable of (H, W) integer arrays
    or tensors, counted in this process without a cache.

    Raises ValueError naming the mask when a label is outside [0, num_classes) and is not
    ``ignore_index``.
    """
    num_classes, num_workers = _as_int("num_classes", num_classes, 1), _as_int("num_workers", num_workers, 0)

    if not _is_mask_source(source):
        if not isinstance(source, Iterable):
            raise TypeError(
                f"source must be a mask source (mask_paths, root, load_mask) or an iterable "
                f"of masks, got {type(source).__name__}"
            )
        items = _iter_plain_counts(source, num_classes, ignore_index)
        return _accumulate(items, num_classes, ignore_index, lambda i: f"mask item {i}")

    path = None
    if cache:
        fingerprint = _fingerprint(source, num_classes, ignore_index)
        path = _cache_path(source, fingerprint)
        stats = _read_cache(path, fingerprint, num_classes)
        if stats is not None:
            log.info("class statistics read from %s", path)
            return stats

    log.info("computing class statistics over %d masks", len(source.mask_paths))
    items = _iter_source_counts(source, num_classes, ignore_index, num_workers)
    stats = _accumulate(items, num_classes, ignore_index, lambda i: str(source.mask_paths[i]))

    if path is not None:
        try:
            _write_json_atomic(path, {"fingerprint": fingerprint, "stats": stats.to_dict()})
        except OSError as err:  # a read-only dataset must not stop training
            log.warning("%s: could not write class statistics cache (%s)", path, err)
    return stats
