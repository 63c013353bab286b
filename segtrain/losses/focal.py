"""Focal losses (Lin et al. 2017): softmax for multiclass, sigmoid for one-channel binary."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.losses import functional as LF


class FocalLoss(nn.Module):
    """Multiclass softmax focal loss; see ``functional.focal_loss``.

    ``normalize="weights"`` divides by sum(weight[target]) so that gamma=0 is weighted
    cross-entropy; ``"pixels"`` divides by the number of valid pixels.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | Sequence[float] | None = None,
        ignore_index: int | None = 255,
        normalize: str = "weights",
    ) -> None:
        super().__init__()
        LF.check_non_negative("gamma", gamma)
        LF.check_choice("normalize", normalize, LF.FOCAL_NORMALIZE)
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.normalize = normalize
        # A buffer so that .to(device) moves it; not persistent because it is rebuilt from the data.
        self.register_buffer("weight", LF.as_class_weights(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.focal_loss(logits, target, self.gamma, self.weight, self.ignore_index, self.normalize)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, normalize={self.normalize!r}, ignore_index={self.ignore_index}"


class BinaryFocalLoss(nn.Module):
    """Sigmoid focal loss for (N, 1, H, W) or (N, H, W) logits and {0, 1} targets, mean over valid pixels.

    Same values as ``torchvision.ops.sigmoid_focal_loss(..., reduction="mean")`` when no
    pixel is ignored; ``alpha=None`` turns the positive/negative balancing off.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, ignore_index: int | None = None) -> None:
        super().__init__()
        LF.check_non_negative("gamma", gamma)
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        self.alpha = alpha
        self.gamma = gamma
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LF.binary_focal_loss(logits, target, self.alpha, self.gamma, self.ignore_index)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, ignore_index={self.ignore_index}"
