"""Reading a mask file into a label map: index PNGs or colour PNGs, label mapping, label checks.

``MaskDecoder`` is the one place that turns a mask file into the (H, W) labels that
training, evaluation and the class statistics see:

1. read: an index PNG (uint8/uint16; a palette PNG gives its indices), or with a palette an
   RGB mask whose colours become classes (``segtrain.data.palette``);
2. map: ``label_mapping`` ``{stored value: class}`` (Cityscapes' labelId -> trainId); values it
   does not list become ``ignore_index``;
3. check: a label outside [0, num_classes) that is not ``ignore_index`` is an error naming the
   file, the values and their pixel counts, or with ``on_bad_label="ignore"`` becomes
   ``ignore_index``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segtrain.data.files import open_image
from segtrain.data.palette import ColorDecoder, parse_palette, read_color_mask
from segtrain.errors import check_choice

ON_BAD_LABEL = ("error", "ignore")
# Above this label value np.bincount would allocate a large histogram; np.unique is used instead.
_BINCOUNT_LIMIT = 1 << 16


def read_mask(path: Path) -> np.ndarray:
    """An index PNG as (H, W) int64."""
    return _read_index_png(path).astype(np.int64)


def _read_index_png(path: Path) -> np.ndarray:
    """(H, W) in the PNG's own dtype (uint8, uint16 or int32): no wider copy than needed."""
    with open_image(path, "mask") as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"{path}: mask mode {img.mode!r}, expected a single-channel index PNG (L, P, I;16); "
                "colour-coded masks need dataset.palette"
            )
        # Palette PNGs keep their indices: np.asarray on mode P gives the index, not the colour.
        return np.array(img)


def mapping_table(mapping: Mapping[Any, Any], num_classes: int, ignore_index: int) -> np.ndarray:
    """A lookup table for ``{stored value: class}``; its last entry (ignore) catches larger values."""
    pairs = []
    for key, value in mapping.items():
        try:
            stored, cls = int(key), int(value)
        except (TypeError, ValueError):
            raise ValueError(f"dataset.label_mapping: {key!r} -> {value!r} is not int -> int") from None
        if stored < 0:
            raise ValueError(f"dataset.label_mapping: stored value {stored} < 0 cannot occur in a PNG mask")
        if not (0 <= cls < num_classes or cls == ignore_index):
            raise ValueError(f"dataset.label_mapping: {stored} -> {cls}; classes are 0..{num_classes - 1} "
                             f"or ignore_index {ignore_index}")
        pairs.append((stored, cls))
    size = max((s for s, _ in pairs), default=-1) + 1
    table = np.full(size + 1, ignore_index, dtype=np.int64)
    for stored, cls in pairs:
        table[stored] = cls
    return table


def value_counts(values: np.ndarray) -> list[tuple[int, int]]:
    """``[(value, pixel count), ...]`` of the values present, ascending."""
    found, counts = np.unique(values, return_counts=True)
    return list(zip(found.tolist(), counts.tolist()))


def bad_label_message(path: Path | str, bad: list[tuple[int, int]], num_classes: int, ignore_index: int) -> str:
    """The one wording for labels outside the classes; ``bad`` is ``[(value, pixel count), ...]``."""
    listed = ", ".join(f"value {v} ({n} px)" for v, n in bad)
    if num_classes == 1:  # ignoring the foreground would train on background alone
        hint = ("a one-class dataset has label 0 only; binary masks (0 = background, 1 = foreground) are two "
                "classes: set dataset.num_classes=2 (and two dataset.class_names)")
    else:
        hint = "fix the mask or set dataset.on_bad_label=ignore"
    return f"{path}: labels outside [0, {num_classes}) and != ignore_index {ignore_index}: {listed}; {hint}"


def count_labels(mask: Any, num_classes: int, ignore_index: int | None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(per-class pixel counts (C,) int64, [(bad label, pixel count), ...]) of one label map.

    ``ignore_index`` pixels are counted nowhere, also when it lies inside [0, num_classes).
    """
    if hasattr(mask, "detach"):  # a torch tensor
        mask = mask.detach().cpu().numpy()
    flat = np.asarray(mask).ravel()
    if flat.dtype.kind not in "iu":
        raise TypeError(f"masks must hold integer labels, got dtype {flat.dtype}")
    counts = np.zeros(num_classes, dtype=np.int64)
    if flat.size == 0:
        return counts, []
    if int(flat.min()) >= 0 and int(flat.max()) < _BINCOUNT_LIMIT:
        hist = np.bincount(flat.astype(np.intp, copy=False), minlength=num_classes)
        values = np.flatnonzero(hist)
        pairs = zip(values.tolist(), hist[values].tolist())
    else:  # a histogram would be huge (or negative labels): count the distinct values instead
        pairs = value_counts(flat.astype(np.int64))
    bad = []
    for value, n in pairs:
        if value == ignore_index:
            continue
        if 0 <= value < num_classes:
            counts[value] = n
        else:
            bad.append((value, n))
    return counts, bad


class MaskDecoder:
    """File -> (H, W) labels; see the module docstring for the three steps."""

    def __init__(self, num_classes: int, ignore_index: int = 255, label_mapping: Mapping | None = None,
                 palette: Any = None, on_unknown_color: str = "error", on_bad_label: str = "error") -> None:
        check_choice("dataset.on_bad_label", on_bad_label, ON_BAD_LABEL)
        if palette is not None and label_mapping is not None:
            raise ValueError("dataset.palette and dataset.label_mapping both set: a palette already maps "
                             "colours to classes; give one of them")
        self.num_classes, self.ignore_index, self.on_bad_label = num_classes, ignore_index, on_bad_label
        self.colors = ColorDecoder(parse_palette(palette, num_classes, ignore_index), ignore_index,
                                   on_unknown_color) if palette is not None else None
        # The smallest dtype that holds every valid label: cheaper to augment and to send between processes.
        self.dtype = np.uint8 if num_classes <= 256 and 0 <= ignore_index <= 255 else np.int32
        # What the stored values mean, for the class-statistics cache fingerprint.
        self.label_mapping: dict | None = None
        self._table = None
        if self.colors is not None:
            self.label_mapping = parse_palette(palette, num_classes, ignore_index)
        elif label_mapping is not None:
            self._table = mapping_table(label_mapping, num_classes, ignore_index).astype(self.dtype)
            self.label_mapping = {int(k): int(v) for k, v in label_mapping.items()}

    def decode(self, path: Path) -> np.ndarray:
        """Read and map, without the label check (``check_dataset.py`` reports that separately)."""
        if self.colors is not None:
            return self.colors(read_color_mask(path), path)
        return self.map_labels(_read_index_png(path))

    def map_labels(self, mask: np.ndarray) -> np.ndarray:
        """Stored values -> classes through ``label_mapping`` (unchanged without one)."""
        if self._table is None:
            return mask
        last = len(self._table) - 1  # the ignore entry, for every value beyond the table (and below 0)
        if mask.dtype.kind == "i" and mask.size and mask.min() < 0:
            mask = np.where(mask < 0, last, mask)
        if last <= np.iinfo(mask.dtype).max:
            mask = np.minimum(mask, mask.dtype.type(last))
        return self._table[mask]

    def bad_pixels(self, mask: np.ndarray) -> np.ndarray | None:
        """Boolean (H, W) of the labels outside the classes, or None when there are none."""
        if mask.size == 0:
            return None
        lo, hi = int(mask.min()), int(mask.max())
        if lo >= 0 and hi < self.num_classes:
            return None
        if lo >= 0 and hi < 1 << 16:  # a histogram is cheaper than a full boolean pass
            hist = np.bincount(mask.ravel())
            hist[: self.num_classes] = 0
            if 0 <= self.ignore_index < hist.size:
                hist[self.ignore_index] = 0
            if not hist.any():
                return None
        bad = ((mask < 0) | (mask >= self.num_classes)) & (mask != self.ignore_index)
        return bad if bad.any() else None

    def check(self, mask: np.ndarray, path: Path | str) -> np.ndarray:
        """Apply ``on_bad_label`` and narrow the dtype."""
        bad = self.bad_pixels(mask)
        if bad is not None:
            if self.on_bad_label == "error":
                raise ValueError(bad_label_message(path, value_counts(mask[bad]), self.num_classes,
                                                   self.ignore_index))
            mask = mask.astype(np.int64)  # a copy that holds any ignore_index
            mask[bad] = self.ignore_index
        return mask.astype(self.dtype, copy=False)

    def __call__(self, path: Path) -> np.ndarray:
        return self.check(self.decode(path), path)
