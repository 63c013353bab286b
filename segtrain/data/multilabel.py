"""Multi-label targets: channels that may overlap, each trained with its own sigmoid.

Two sources, one representation:

- **regions** of an ordinary label map (``dataset.regions: {whole: [1, 2, 3], core: [2, 3], enhancing: [3]}``): a
  pixel is positive in every region that lists its label; ``ignore_index`` pixels are ignored in every channel;
- **per-class binary masks** (``dataset.layout=binary_masks``): ``masks/<split>/<stem>/<class_name>.png``, any
  non-zero value positive; a missing file is all-negative or all-ignored for that class
  (``dataset.missing_mask``); an optional ``<stem>/ignore.png`` marks pixels ignored in every channel.

Between the files and the training loop a target is one (H, W) int32 *code* per pixel: bit c says "positive in
channel c", bit C + c "ignored in channel c". A code map is a label map to every step that moves pixels (the
augmentation's nearest-neighbour warps and padding, crops, collation), so the whole data path serves both kinds of
data; the collate function unpacks a batch into the (N, C, H, W) uint8 targets (0, 1, ``ignore_index``) that the
multi-label losses and metrics take. Pixels created by padding get ``fill_code``: ignored in every channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain.data.files import open_image
from segtrain.data.masks import MaskDecoder, count_labels
from segtrain.errors import check_choice

# 2 bits a channel in an int32 code (the augmentation's OpenCV warps take int32, not int64).
MAX_CHANNELS = 15
MISSING_MASK = ("negative", "ignore")
IGNORE_FILE = "ignore"  # <stem>/ignore.png: pixels ignored in every channel


def check_channels(channels: int) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"a multi-label dataset has 1..{MAX_CHANNELS} channels (two bits each in an int32 code), "
                         f"got {channels!r}")
    return channels


def fill_code(channels: int) -> int:
    """The code of a pixel ignored in every channel (padding)."""
    return ((1 << channels) - 1) << channels


def pack(positive: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """(H, W, C) booleans -> (H, W) int32 codes."""
    channels = positive.shape[-1]
    shifts = np.arange(channels, dtype=np.int32)
    code = (positive.astype(np.int32) << shifts).sum(-1, dtype=np.int32)
    return code | (ignored.astype(np.int32) << (shifts + channels)).sum(-1, dtype=np.int32)


def unpack(codes: torch.Tensor, channels: int, ignore_index: int = 255) -> torch.Tensor:
    """(..., H, W) codes -> (..., C, H, W) uint8 targets: 1 positive, 0 negative, ``ignore_index`` ignored."""
    shifts = torch.arange(channels, device=codes.device).view(channels, 1, 1)
    codes = codes.to(torch.int32).unsqueeze(-3)
    positive = (codes >> shifts) & 1
    ignored = ((codes >> (shifts + channels)) & 1).bool()
    return positive.to(torch.uint8).masked_fill(ignored, ignore_index)


def channel_counts(codes: np.ndarray, channels: int) -> np.ndarray:
    """(2C,) int64: the positive pixels of each channel, then its valid (not ignored) pixels."""
    values, counts = np.unique(np.asarray(codes).ravel(), return_counts=True)
    bits = (values[:, None].astype(np.int64) >> np.arange(2 * channels)) & 1  # (V, 2C)
    positive = (bits[:, :channels] & (1 - bits[:, channels:])) * counts[:, None]
    valid = (1 - bits[:, channels:]) * counts[:, None]
    return np.concatenate([positive.sum(0), valid.sum(0)]).astype(np.int64)


def parse_regions(regions: Mapping[str, Sequence[int]], ignore_index: int) -> tuple[list[str], list[list[int]]]:
    """(names, labels of each region) of ``dataset.regions``, checked."""
    if not isinstance(regions, Mapping) or not regions:
        raise ValueError(f"dataset.regions must map region names to lists of labels, e.g. "
                         f"{{whole: [1, 2, 3], core: [2, 3]}}; got {regions!r}")
    names, labels = [], []
    for name, members in regions.items():
        if isinstance(members, int) and not isinstance(members, bool):
            members = [members]
        if not isinstance(members, Sequence) or isinstance(members, str) or not members or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v != ignore_index for v in members):
            raise ValueError(f"dataset.regions.{name}: {members!r}; expected a non-empty list of labels >= 0 "
                             f"(not ignore_index {ignore_index})")
        names.append(str(name))
        labels.append(sorted(set(members)))
    check_channels(len(names))
    return names, labels


class RegionDecoder:
    """A label-map file -> codes of its regions. The label map is read and checked as ``MaskDecoder`` reads any
    mask, with the labels 0..(largest label a region lists) as its classes: a label in no region is negative
    everywhere, a larger one is a bad label (``dataset.on_bad_label``)."""

    def __init__(self, regions: Mapping[str, Sequence[int]], ignore_index: int = 255, **mask_options: Any) -> None:
        self.names, members = parse_regions(regions, ignore_index)
        self.channels = len(self.names)
        self.num_labels = max(max(m) for m in members) + 1
        self.labels = MaskDecoder(self.num_labels, ignore_index, **mask_options)
        self.ignore_index, self.on_bad_label = ignore_index, self.labels.on_bad_label
        table = np.zeros(self.num_labels, dtype=np.int32)
        for c, m in enumerate(members):
            table[m] |= 1 << c
        self._table = table
        self.label_mapping = {"regions": dict(zip(self.names, members)), "labels": self.labels.label_mapping}

    def decode(self, path: Path) -> np.ndarray:
        """The label map, unchecked (the class-count pass checks it)."""
        return self.labels.decode(path)

    def count(self, labels: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """((2C,) channel counts, [(bad label, pixels), ...]) of a label map."""
        counts, bad = count_labels(labels, self.num_labels, self.ignore_index)
        positive = np.array([counts[self._table & (1 << c) > 0].sum() for c in range(self.channels)])
        return np.concatenate([positive, np.full(self.channels, counts.sum())]).astype(np.int64), bad

    def to_codes(self, labels: np.ndarray) -> np.ndarray:
        # The ignore entry last: every label the check turned into ignore_index lands on it.
        table = np.append(self._table, fill_code(self.channels)).astype(np.int32)
        index = np.where((labels >= 0) & (labels < self.num_labels), labels, self.num_labels)
        return table[index]

    def __call__(self, path: Path) -> np.ndarray:
        return self.to_codes(self.labels.check(self.decode(path), path))


class BinaryMaskDecoder:
    """A folder ``<stem>/`` of per-class binary PNGs -> codes."""

    def __init__(self, class_names: Sequence[str], missing_mask: str = "negative", suffix: str = ".png") -> None:
        check_choice("dataset.missing_mask", missing_mask, MISSING_MASK)
        self.names, self.missing, self.suffix = list(class_names), missing_mask, suffix
        self.channels = check_channels(len(self.names))
        if IGNORE_FILE in self.names:
            raise ValueError(f"dataset.class_names: '{IGNORE_FILE}' names the file of ignored pixels "
                             f"({IGNORE_FILE}{suffix}); rename that class")
        self.on_bad_label = "error"
        self.label_mapping = {"binary_masks": self.names, "missing_mask": missing_mask}

    def files(self, folder: Path) -> list[Path]:
        """The files of one image that exist, for the class-count cache's fingerprint."""
        return [p for name in (*self.names, IGNORE_FILE) if (p := folder / f"{name}{self.suffix}").is_file()]

    def _read(self, path: Path) -> np.ndarray:
        with open_image(path, "mask") as img:
            if img.mode not in ("1", "L", "P", "I", "I;16"):
                raise ValueError(f"{path}: mask mode {img.mode!r}; a binary mask is a single-channel PNG "
                                 "(0 = absent, any other value = present)")
            return np.asarray(img) != 0

    def decode(self, folder: Path) -> np.ndarray:
        folder = Path(folder)
        layers: dict[str, np.ndarray] = {}
        for name in (*self.names, IGNORE_FILE):
            path = folder / f"{name}{self.suffix}"
            if path.is_file():
                layers[name] = self._read(path)
        if not any(name in layers for name in self.names):
            files = ", ".join(n + self.suffix for n in self.names)
            raise FileNotFoundError(f"{folder}: none of the class masks {files} is there; an image with no object "
                                    "of any class still needs its folder with at least one all-zero mask, to give "
                                    "its size")
        shapes = {name: layer.shape for name, layer in layers.items()}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{n}{self.suffix} {s[1]}x{s[0]}" for n, s in shapes.items())
            raise ValueError(f"{folder}: the masks differ in size: {listed}")
        shape = next(iter(shapes.values()))
        ignore = layers.get(IGNORE_FILE, np.zeros(shape, dtype=bool))
        positive = np.stack([layers.get(n, np.zeros(shape, dtype=bool)) for n in self.names], -1)
        absent = np.array([n not in layers for n in self.names]) & (self.missing == "ignore")
        ignored = ignore[..., None] | absent
        return pack(positive & ~ignored, ignored)

    def count(self, codes: np.ndarray) -> tuple[np.ndarray, list]:
        return channel_counts(codes, self.channels), []

    def __call__(self, folder: Path) -> np.ndarray:
        return self.decode(folder)
