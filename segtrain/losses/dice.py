"""Dice losses: soft multiclass Dice, sigmoid binary Dice, generalized Dice (Sudre et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segtrain.losses import functional as LF
from segtrain.losses import functional_overlap as LO
from segtrain.losses.base import LossModule


class DiceLoss(LossModule):
    """1 - mean over classes of the soft Dice of softmax p and the one-hot target.

    D_c = (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth), p^2 and g^2 in the
    denominator when ``squared``; sums over the whole batch when ``batch`` (steadier for
    classes that are missing from some images), else per image. ``weight`` makes the class
    mean sum(w_c D_c) / sum(w_c); ``include_background=False`` drops class 0.
    """

    def __init__(self, smooth: float = 1e-5, batch: bool = True, squared: bool = False,
                 include_background: bool = True, weight: torch.Tensor | Sequence[float] | None = None,
                 ignore_index: int | None = 255) -> None:
        LF.check_non_negative("smooth", smooth)
        super().__init__(smooth=smooth, batch=batch, squared=squared, include_background=include_background,
                         weight=weight, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.dice_loss(logits, target, self.smooth, self.batch, self.squared, self.include_background,
                            self.weight, self.ignore_index)


class BinaryDiceLoss(LossModule):
    """Sigmoid Dice of the foreground for one-channel logits; the binary counterpart of DiceLoss."""

    def __init__(self, smooth: float = 1e-5, batch: bool = True, squared: bool = False,
                 include_background: bool = False, ignore_index: int | None = None) -> None:
        LF.check_non_negative("smooth", smooth)
        super().__init__(smooth=smooth, batch=batch, squared=squared, include_background=include_background,
                         ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.binary_dice_loss(logits, target, self.smooth, self.batch, self.squared, self.include_background,
                                   self.ignore_index)


class GeneralizedDiceLoss(LossModule):
    """Generalized Dice: classes weighted by 1 / (pixel count in the batch)^2, so rare ones count as much."""

    def __init__(self, smooth: float = 1e-5, ignore_index: int | None = 255) -> None:
        LF.check_non_negative("smooth", smooth)
        super().__init__(smooth=smooth, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.generalized_dice_loss(logits, target, self.smooth, self.ignore_index)
