"""Cross-entropy losses: plain, online hard example mining (OHEM), and binary (sigmoid)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segtrain.losses import functional as LF
from segtrain.losses.base import LossModule


class CrossEntropyLoss(LossModule):
    """``F.cross_entropy`` (weighted mean over valid pixels) that gives 0, not NaN, when no pixel is valid."""

    def __init__(self, weight: torch.Tensor | Sequence[float] | None = None, ignore_index: int | None = 255,
                 label_smoothing: float = 0.0) -> None:
        if not 0 <= label_smoothing <= 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.cross_entropy(logits, target, self.weight, self.ignore_index, self.label_smoothing)


class OhemCrossEntropyLoss(LossModule):
    """Cross-entropy over pixels with p_t < ``thresh``, and at least the ``min_kept`` hardest ones."""

    def __init__(self, thresh: float = 0.7, min_kept: int = 100_000,
                 weight: torch.Tensor | Sequence[float] | None = None, ignore_index: int | None = 255) -> None:
        if not 0 < thresh <= 1:
            raise ValueError(f"thresh must be in (0, 1], got {thresh}")
        if int(min_kept) != min_kept or min_kept < 0:
            raise ValueError(f"min_kept must be an integer >= 0, got {min_kept}")
        super().__init__(thresh=thresh, min_kept=int(min_kept), weight=weight, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.ohem_cross_entropy(logits, target, self.thresh, self.min_kept, self.weight, self.ignore_index)


class BinaryCrossEntropyLoss(LossModule):
    """BCE with logits for one-channel logits and {0, 1} targets, mean over valid pixels."""

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__(ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.binary_focal_loss(logits, target, alpha=None, gamma=0.0, ignore_index=self.ignore_index)
