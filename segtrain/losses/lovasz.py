"""Lovasz-softmax loss (Berman et al. 2018): a convex surrogate that optimises mean IoU directly."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.losses import functional_overlap as LO


class LovaszSoftmaxLoss(nn.Module):
    """Lovasz extension of the Jaccard loss over the batch, averaged over classes present in the target.

    Usually added to cross-entropy or focal with a small weight, or used to fine-tune:
    it has no per-class weight because it already scores each class by its own IoU.
    """

    def __init__(self, ignore_index: int | None = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LO.lovasz_softmax_loss(logits, target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"
