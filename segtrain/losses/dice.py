"""Dice losses: soft multiclass Dice, sigmoid binary Dice, generalized Dice (Sudre et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.losses import functional as LF
from segtrain.losses import functional_overlap as LO


class DiceLoss(nn.Module):
    """1 - mean over classes of the soft Dice of softmax p and the one-hot target.

    D_c = (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth), p^2 and g^2 in the
    denominator when ``squared``; sums over the whole batch when ``batch`` (steadier for
    classes that are missing from some images), else per image. ``weight`` makes the class
    mean sum(w_c D_c) / sum(w_c); ``include_background=False`` drops class 0.
    """

    def __init__(
        self,
        smooth: float = 1e-5,
        batch: bool = True,
        squared: bool = False,
        include_background: bool = True,
        weight: torch.Tensor | Sequence[float] | None = None,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__()
        LF.check_non_negative("smooth", smooth)
        self.smooth = smooth
        self.batch = batch
        self.squared = squared
        self.include_background = include_background
        self.ignore_index = ignore_index
        # A buffer so that .to(device) moves it; not persistent because it is rebuilt from the data.
        self.register_buffer("weight", LF.as_class_weights(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.dice_loss(
            logits, target, self.smooth, self.batch, self.squared, self.include_background, self.weight,
            self.ignore_index,
        )

    def extra_repr(self) -> str:
        return (
            f"smooth={self.smooth}, batch={self.batch}, squared={self.squared}, "
            f"include_background={self.include_background}, ignore_index={self.ignore_index}"
        )


class BinaryDiceLoss(nn.Module):
    """Sigmoid Dice of the foreground for one-channel logits; the binary counterpart of DiceLoss."""

    def __init__(
        self,
        smooth: float = 1e-5,
        batch: bool = True,
        squared: bool = False,
        include_background: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        LF.check_non_negative("smooth", smooth)
        self.smooth = smooth
        self.batch = batch
        self.squared = squared
        self.include_background = include_background
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.binary_dice_loss(
            logits, target, self.smooth, self.batch, self.squared, self.include_background, self.ignore_index
        )

    def extra_repr(self) -> str:
        return (
            f"smooth={self.smooth}, batch={self.batch}, squared={self.squared}, "
            f"include_background={self.include_background}, ignore_index={self.ignore_index}"
        )


class GeneralizedDiceLoss(nn.Module):
    """Generalized Dice: classes weighted by 1 / (pixel count in the batch)^2, so rare ones count as much."""

    def __init__(self, smooth: float = 1e-5, ignore_index: int | None = 255) -> None:
        super().__init__()
        LF.check_non_negative("smooth", smooth)
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.generalized_dice_loss(logits, target, self.smooth, self.ignore_index)

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, ignore_index={self.ignore_index}"
