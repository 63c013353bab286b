"""Image-level repeat factors for rare classes (Gupta et al. 2019, LVIS).

For a class c present in a fraction f(c) of the training images, r(c) = max(1, sqrt(t / f(c)));
an image's repeat factor is the largest r(c) over the classes it contains, so an image that
shows a class rarer than the threshold ``t`` is drawn about r times per epoch.
``EpochSampler`` turns the (fractional) factors into each epoch's draws. The presence matrix
comes from the per-image class counts of the one pass over the masks (``segtrain.data.scan``).
"""

from __future__ import annotations

import numpy as np


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
