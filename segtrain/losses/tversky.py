"""Tversky loss (Salehi et al. 2017) and its focal variant (Abraham & Khan 2019)."""

from __future__ import annotations

import torch

from segtrain.losses import functional as LF
from segtrain.losses import functional_overlap as LO
from segtrain.losses.base import LossModule


class TverskyLoss(LossModule):
    """Mean over classes of (1 - TI_c)^gamma with TI_c = TP / (TP + alpha FP + beta FN), smoothed.

    beta > alpha penalises missed pixels more than false alarms, which favours recall on
    small classes; alpha = beta = 0.5 and gamma = 1 is the Dice loss.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, gamma: float = 1.0, smooth: float = 1e-5,
                 ignore_index: int | None = 255) -> None:
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("smooth", smooth)):
            LF.check_non_negative(name, value)
        super().__init__(alpha=alpha, beta=beta, gamma=gamma, smooth=smooth, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.tversky_loss(logits, target, self.alpha, self.beta, self.gamma, self.smooth, self.ignore_index)
