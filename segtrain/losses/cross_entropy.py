"""Cross-entropy losses: plain, online hard example mining (OHEM), and binary (sigmoid)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.losses import functional as LF


class CrossEntropyLoss(nn.Module):
    """``F.cross_entropy`` (weighted mean over valid pixels) that gives 0, not NaN, when no pixel is valid."""

    def __init__(
        self,
        weight: torch.Tensor | Sequence[float] | None = None,
        ignore_index: int | None = 255,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing <= 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        # A buffer so that .to(device) moves it; not persistent because it is rebuilt from the data.
        self.register_buffer("weight", LF.as_class_weights(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.cross_entropy(logits, target, self.weight, self.ignore_index, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}"


class OhemCrossEntropyLoss(nn.Module):
    """Cross-entropy over pixels with p_t < ``thresh``, and at least the ``min_kept`` hardest ones."""

    def __init__(
        self,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        weight: torch.Tensor | Sequence[float] | None = None,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__()
        if not 0 < thresh <= 1:
            raise ValueError(f"thresh must be in (0, 1], got {thresh}")
        if int(min_kept) != min_kept or min_kept < 0:
            raise ValueError(f"min_kept must be an integer >= 0, got {min_kept}")
        self.thresh = thresh
        self.min_kept = int(min_kept)
        self.ignore_index = ignore_index
        self.register_buffer("weight", LF.as_class_weights(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.ohem_cross_entropy(logits, target, self.thresh, self.min_kept, self.weight, self.ignore_index)

    def extra_repr(self) -> str:
        return f"thresh={self.thresh}, min_kept={self.min_kept}, ignore_index={self.ignore_index}"


class BinaryCrossEntropyLoss(nn.Module):
    """BCE with logits for one-channel logits and {0, 1} targets, mean over valid pixels."""

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.binary_focal_loss(logits, target, alpha=None, gamma=0.0, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"
