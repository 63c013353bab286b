"""Lovasz-softmax loss (Berman et al. 2018): a convex surrogate that optimises mean IoU directly."""

from __future__ import annotations

import torch

from segtrain.losses import functional_overlap as LO
from segtrain.losses.base import LossModule


class LovaszSoftmaxLoss(LossModule):
    """Lovasz extension of the Jaccard loss over the batch, averaged over classes present in the target.

    Usually added to cross-entropy or focal with a small loss_weight, or used to fine-tune:
    it has no per-class weight because it already scores each class by its own IoU.
    """

    def __init__(self, ignore_index: int | None = 255) -> None:
        super().__init__(ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.lovasz_softmax_loss(logits, target, self.ignore_index)
