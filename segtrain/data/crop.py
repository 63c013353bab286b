"""A random crop that can look for rare classes, and refuse crops that are one class only.

With probability ``rare_crop_p`` the crop is centred on a pixel of a class drawn among the
classes present in the (rescaled, padded) mask, each with probability proportional to
1 / (its pixel share over the training set); otherwise it is an ordinary uniform crop. Tiny
rare objects then land in the crop far more often than their area would give them.

``cat_max_ratio`` (as in mmsegmentation) redraws, up to ``max_tries`` times, a crop whose most
frequent class covers that share or more of its labelled pixels, or that holds a single class;
the last draw is kept if none passes.

All randomness comes from the transform's own generator, which ``Compose.set_random_seed``
seeds, so a draw is a pure function of the dataset's ``(index, seed)`` key.
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import numpy as np

from segtrain.data.multilabel import channel_counts


class ClassAwareCrop(A.RandomCrop):
    """``RandomCrop`` (no padding: pad before it) with rare-class centring and ``cat_max_ratio``."""

    def __init__(self, height: int, width: int, ignore_index: int = 255, rare_crop_p: float = 0.0,
                 cat_max_ratio: float | None = None, class_frequency: Sequence[float] | None = None,
                 max_tries: int = 10, p: float = 1.0, channels: int | None = None) -> None:
        super().__init__(height=height, width=width, p=p)
        if channels is not None and cat_max_ratio is not None:
            raise ValueError("dataset.sampling.cat_max_ratio limits the share of one class in a crop of a label map; "
                             "multi-label channels overlap and have no such share: leave it null (rare_crop_p and "
                             "repeat_thresh work per channel)")
        self.channels = channels  # multi-label codes (segtrain.data.multilabel): rare crops by channel
        if not 0.0 <= rare_crop_p <= 1.0:
            raise ValueError(f"dataset.sampling.rare_crop_p={rare_crop_p}; expected a probability in [0, 1]")
        if cat_max_ratio is not None and not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"dataset.sampling.cat_max_ratio={cat_max_ratio}; expected null or a share in (0, 1]")
        self.ignore_index = ignore_index
        self.rare_crop_p = float(rare_crop_p)
        self.cat_max_ratio = cat_max_ratio
        self.max_tries = max_tries
        # Probability of centring on class c (before normalising over the classes in the mask):
        # 1 / its pixel share in the training set, 0 for absent classes.
        self.draw_weights: np.ndarray | None = None
        if self.rare_crop_p > 0:
            if class_frequency is None:
                raise ValueError("dataset.sampling.rare_crop_p > 0 needs the class frequencies of the training "
                                 "split (ClassStats.frequency) when the transform is built")
            freq = np.asarray(class_frequency, dtype=np.float64)
            if freq.ndim != 1 or (freq < 0).any() or not np.isfinite(freq).all():
                raise ValueError(f"class frequencies must be a 1-D array of shares >= 0, got {class_frequency!r}")
            self.draw_weights = np.divide(1.0, freq, out=np.zeros_like(freq), where=freq > 0)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        mask = data["mask"]
        if self.rare_crop_p == 0 and self.cat_max_ratio is None:
            return super().get_params_dependent_on_data(params, data)  # the plain crop, same draws
        if mask.shape[0] < self.height or mask.shape[1] < self.width:
            raise ValueError(f"ClassAwareCrop: mask {mask.shape} is smaller than the crop; pad before cropping")
        for _ in range(self.max_tries):
            if self.rare_crop_p > 0 and self.py_random.random() < self.rare_crop_p:
                coords = self._centred_on_rare_class(mask)
            else:
                coords = super().get_params_dependent_on_data(params, data)["crop_coords"]
            if self.cat_max_ratio is None or self._mixed_enough(mask, coords):
                break
        return {"crop_coords": coords, "pad_params": None}

    def _centred_on_rare_class(self, mask: np.ndarray) -> tuple[int, int, int, int]:
        num_classes = self.draw_weights.size
        if self.channels is None:
            labels = mask.ravel() if self.ignore_index >= 0 else mask[mask != self.ignore_index]
            hist = np.bincount(labels, minlength=num_classes)[:num_classes]
        else:  # which channels have a positive pixel here (bit c of the code, not ignored)
            hist = channel_counts(mask, self.channels)[: self.channels]
        weights = np.where(hist > 0, self.draw_weights, 0.0)
        if weights.sum() <= 0:  # nothing labelled here (all ignore): any crop will do
            return self._uniform(mask.shape)
        cls = self.py_random.choices(range(weights.size), weights=weights.tolist())[0]
        flat = np.flatnonzero(mask == cls if self.channels is None else (mask >> cls) & 1)
        y, x = divmod(int(flat[self.py_random.randrange(flat.size)]), mask.shape[1])
        top = min(max(y - self.height // 2, 0), mask.shape[0] - self.height)
        left = min(max(x - self.width // 2, 0), mask.shape[1] - self.width)
        return left, top, left + self.width, top + self.height

    def _uniform(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        top = self.py_random.randint(0, shape[0] - self.height)
        left = self.py_random.randint(0, shape[1] - self.width)
        return left, top, left + self.width, top + self.height

    def _mixed_enough(self, mask: np.ndarray, coords: tuple[int, int, int, int]) -> bool:
        x0, y0, x1, y1 = coords
        labels = mask[y0:y1, x0:x1].ravel()
        counts = np.bincount(labels[labels != self.ignore_index])
        counts = counts[counts > 0]
        return counts.size > 1 and counts.max() / counts.sum() < self.cat_max_ratio
