"""Per-class pixel and image statistics of a training split, from its per-image class counts.

The counts come from one pass over the raw training masks (label mapping applied, no
augmentation; ``segtrain.data.scan``, cached). Augmentation is left out on purpose: random
crops and flips change the counts from epoch to epoch, and the class weights must describe
the data, not one draw of the augmentation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from segtrain.data.masks import bad_label_message, count_labels
from segtrain.data.scan import as_int, image_class_counts, is_mask_source


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

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> ClassStats:
        """From the (N, C) pixels of each class in each image."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2:
            raise ValueError(f"per-image class counts must be (N, C), got shape {counts.shape}")
        present = counts > 0  # (N, C)
        pixels = counts.sum(axis=0)
        present_pixels = (present * counts.sum(axis=1, keepdims=True)).sum(axis=0)
        return cls(pixels, present.sum(axis=0), present_pixels, int(pixels.sum()), counts.shape[0])

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


@dataclass(eq=False)
class ChannelStats:
    """Per-channel counts over a training split (int64 arrays of shape (C,)).

    positive[c]  pixels positive in channel c
    valid[c]     pixels not ignored in channel c
    images[c]    images with at least one positive pixel of c
    """

    positive: np.ndarray
    valid: np.ndarray
    images: np.ndarray
    num_images: int
    binary: list[ClassStats]  # per channel, the two classes [absent, present]: what the weight strategies take

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> ChannelStats:
        """From the (N, 2C) counts of the class-count pass: positives, then valid pixels."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[1] % 2:
            raise ValueError(f"multi-label counts must be (N, 2C), got shape {counts.shape}")
        channels = counts.shape[1] // 2
        positive, valid = counts[:, :channels], counts[:, channels:]
        binary = [ClassStats.from_counts(np.stack([valid[:, c] - positive[:, c], positive[:, c]], 1))
                  for c in range(channels)]
        return cls(positive.sum(0), valid.sum(0), (positive > 0).sum(0), counts.shape[0], binary)

    @property
    def num_classes(self) -> int:
        return int(self.positive.size)

    @property
    def frequency(self) -> np.ndarray:
        """Share of a channel's valid pixels that are positive (its imbalance against its own absence)."""
        return np.divide(self.positive, self.valid, out=np.zeros(self.positive.shape), where=self.valid > 0)

    @property
    def total_pixels(self) -> int:
        return int(self.valid.max(initial=0))

    def presence(self, counts: np.ndarray) -> np.ndarray:
        """(N, C) images containing each channel, from the per-image counts."""
        return np.asarray(counts)[:, : self.num_classes] > 0

    def to_dict(self) -> dict[str, Any]:
        return {"positive": self.positive.tolist(), "valid": self.valid.tolist(), "images": self.images.tolist(),
                "num_images": self.num_images}


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(num.shape, dtype=np.float64)
    return np.divide(num, den, out=out, where=den > 0, dtype=np.float64)


def _plain_counts(masks: Iterable, num_classes: int, ignore_index: int | None) -> np.ndarray:
    rows = []
    for index, mask in enumerate(masks):
        try:
            counts, bad = count_labels(mask, num_classes, ignore_index)
        except TypeError as err:
            raise TypeError(f"mask item {index}: {err}") from None
        if bad:
            raise ValueError(bad_label_message(f"mask item {index}", bad, num_classes, ignore_index))
        rows.append(counts)
    return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)


def compute_class_stats(source: Any, num_classes: int, ignore_index: int | None = 255, num_workers: int = 0,
                        cache: bool = True) -> ClassStats:
    """Count pixels and images per class over a training split.

    ``source`` is a mask source (``segtrain.data.scan``: a dataset, counted through the cached
    one-pass ``image_class_counts`` with ``num_workers`` decoding workers), or any iterable of
    (H, W) integer arrays or tensors, counted in this process without a cache.

    Raises ValueError naming the mask when a label is outside [0, num_classes) and is not
    ``ignore_index`` (and, for a dataset, on any other bad pair).
    """
    num_classes = as_int("num_classes", num_classes, 1)
    if is_mask_source(source):
        return ClassStats.from_counts(image_class_counts(source, num_classes, ignore_index, num_workers, cache))
    if not isinstance(source, Iterable):
        raise TypeError(f"source must be a mask source (root, mask_paths, load_mask) or an iterable of masks, "
                        f"got {type(source).__name__}")
    return ClassStats.from_counts(_plain_counts(source, num_classes, ignore_index))
