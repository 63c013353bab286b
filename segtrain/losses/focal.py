"""Focal losses (Lin et al. 2017): softmax for multiclass, sigmoid for one-channel binary."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segtrain.errors import check_choice
from segtrain.losses import functional as LF
from segtrain.losses.base import LossModule


class FocalLoss(LossModule):
    """Multiclass softmax focal loss; see ``functional.focal_loss``.

    ``normalize="weights"`` divides by sum(weight[target]) so that gamma=0 is weighted
    cross-entropy; ``"pixels"`` divides by the number of valid pixels.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | Sequence[float] | None = None,
                 ignore_index: int | None = 255, normalize: str = "weights") -> None:
        LF.check_non_negative("gamma", gamma)
        check_choice("normalize", normalize, LF.FOCAL_NORMALIZE)
        super().__init__(gamma=gamma, weight=weight, ignore_index=ignore_index, normalize=normalize)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.focal_loss(logits, target, self.gamma, self.weight, self.ignore_index, self.normalize)


class BinaryFocalLoss(LossModule):
    """Sigmoid focal loss for (N, 1, H, W) or (N, H, W) logits and {0, 1} targets, mean over valid pixels.

    Same values as ``torchvision.ops.sigmoid_focal_loss(..., reduction="mean")`` when no
    pixel is ignored; ``alpha=None`` turns the positive/negative balancing off.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, ignore_index: int | None = None) -> None:
        LF.check_non_negative("gamma", gamma)
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        super().__init__(alpha=alpha, gamma=gamma, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.binary_focal_loss(logits, target, self.alpha, self.gamma, self.ignore_index)
