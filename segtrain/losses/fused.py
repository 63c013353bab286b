"""The fused focal (or cross-entropy) + Dice term, and when a pair of terms may use it.

``CompositeLoss`` replaces a FocalLoss (or an unsmoothed CrossEntropyLoss) and a non-squared
DiceLoss with one ``FocalDiceLoss`` when it is built: one softmax for both values, the same
values and gradients, about half the time and memory of the two apart
(``functional_fused``, scripts/bench_losses.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from segtrain.losses.cross_entropy import CrossEntropyLoss
from segtrain.losses.dice import DiceLoss
from segtrain.losses.focal import FocalLoss
from segtrain.losses.functional_fused import focal_dice_loss


def fusable_pair(terms: Mapping[str, nn.Module]) -> tuple[str, str] | None:
    """Names of a pixel term (focal, or cross-entropy without smoothing) and a Dice term to compute together.

    Exact classes only: a subclass may have changed what its forward computes. The multi-label
    terms (MultilabelFocalLoss, MultilabelDiceLoss) are other classes, so they are never fused.
    """
    pixel = next((name for name, m in terms.items() if type(m) is FocalLoss
                  or (type(m) is CrossEntropyLoss and m.label_smoothing == 0)), None)
    dice = next((name for name, m in terms.items() if type(m) is DiceLoss and not m.squared), None)
    if pixel is None or dice is None or terms[pixel].ignore_index != terms[dice].ignore_index:
        return None
    return pixel, dice


class FocalDiceLoss(nn.Module):
    """(pixel term, Dice term) from one softmax; the two modules keep their own options.

    ``pixel`` is a FocalLoss or an unsmoothed CrossEntropyLoss, ``dice`` a non-squared DiceLoss
    with the same ignore_index (``fusable_pair``). Their options are read at every call, but
    whether the pair is fusable was decided when this module was built.
    """

    def __init__(self, pixel: FocalLoss | CrossEntropyLoss, dice: DiceLoss) -> None:
        super().__init__()
        if fusable_pair({"pixel": pixel, "dice": dice}) != ("pixel", "dice"):
            raise ValueError(f"{type(pixel).__name__} and {type(dice).__name__} cannot be fused; see fusable_pair")
        self.pixel, self.dice = pixel, dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.ndim < 3:  # (N, C) logits without pixels: the fused kernel works on pixel views
            return self.pixel(logits, target), self.dice(logits, target)
        pixel, dice = self.pixel, self.dice
        gamma, normalize = (pixel.gamma, pixel.normalize) if isinstance(pixel, FocalLoss) else (0.0, "weights")
        return focal_dice_loss(logits, target, gamma, pixel.weight, normalize, dice.smooth, dice.batch,
                               dice.include_background, dice.weight, dice.ignore_index)
