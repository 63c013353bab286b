"""Image-level repeat factors for rare classes (Gupta et al. 2019, LVIS), and the per-image
class counts they are computed from.

For a class c present in a fraction f(c) of the training images, r(c) = max(1, sqrt(t / f(c)));
an image's repeat factor is the largest r(c) over the classes it contains, so an image that
shows a class rarer than the threshold ``t`` is drawn about r times per epoch.
``EpochSampler`` turns the (fractional) factors into each epoch's draws.

The per-image counts need one pass over the masks. They are cached next to the class
statistics, under the same fingerprint of the mask files and label mapping
(``class_stats_cache_file``), so that a second run reads no mask.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain.data.stats import class_stats_cache_file

log = logging.getLogger(__name__)


class _CountsPerMask(torch.utils.data.Dataset):
    """Counts in the worker: only a (C,) vector per mask crosses the process boundary."""

    def __init__(self, source: Any, num_classes: int) -> None:
        self.source, self.num_classes = source, num_classes

    def __len__(self) -> int:
        return len(self.source.mask_paths)

    def __getitem__(self, index: int) -> np.ndarray:
        labels = np.asarray(self.source.load_mask(index)).ravel()
        labels = labels[(labels >= 0) & (labels < self.num_classes)]
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)


def _unchanged(item: Any) -> Any:
    return item


def _cache_file(source: Any, num_classes: int, ignore_index: int) -> Path:
    stats_file = class_stats_cache_file(source, num_classes, ignore_index)
    return stats_file.with_name(stats_file.name.replace("class_stats-", "image_class_counts-")).with_suffix(".npy")


def image_class_counts(source: Any, num_classes: int, ignore_index: int = 255, num_workers: int = 0,
                       cache: bool = True) -> np.ndarray:
    """(N, C) int64: pixels of each class in each mask of the mask source (label mapping applied)."""
    path = _cache_file(source, num_classes, ignore_index) if cache else None
    if path is not None and path.is_file():
        try:
            counts = np.load(path)
            if counts.shape == (len(source.mask_paths), num_classes):
                log.info("per-image class counts read from %s", path)
                return counts
            log.warning("%s: cached counts have shape %s, expected %s; recomputing", path, counts.shape,
                        (len(source.mask_paths), num_classes))
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable per-image class counts (%s); recomputing", path, err)
    log.info("counting classes per image over %d masks", len(source.mask_paths))
    dataset = _CountsPerMask(source, num_classes)
    if num_workers == 0:
        rows = [dataset[i] for i in range(len(dataset))]
    else:
        rows = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                                collate_fn=_unchanged))
    counts = np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")  # several DDP ranks may write at once
            np.save(tmp, counts)
            os.replace(tmp, path)
        except OSError as err:  # a read-only dataset must not stop training
            log.warning("%s: could not write per-image class counts (%s)", path, err)
    return counts


def class_repeat_factors(presence: np.ndarray, thresh: float) -> np.ndarray:
    """r(c) = max(1, sqrt(thresh / f(c))), f(c) = share of images containing c; 1 for absent classes."""
    if thresh <= 0:
        raise ValueError(f"dataset.sampling.repeat_thresh={thresh}; expected a share of images > 0, or null")
    presence = np.asarray(presence, dtype=bool)  # (N, C)
    frac = presence.mean(axis=0) if presence.shape[0] else np.zeros(presence.shape[1])
    ratio = np.divide(thresh, frac, out=np.ones_like(frac), where=frac > 0)
    return np.maximum(1.0, np.sqrt(ratio))


def image_repeat_factors(presence: np.ndarray, thresh: float) -> np.ndarray:
    """(N,) float64: the largest class repeat factor among the classes of each image (1 if none)."""
    presence = np.asarray(presence, dtype=bool)
    per_class = class_repeat_factors(presence, thresh)
    return np.where(presence, per_class, 1.0).max(axis=1, initial=1.0)
