"""Segmentation losses: pure math in ``functional`` / ``functional_overlap``, thin modules, composition.

Every multiclass loss takes ``(logits (N, C, H, W), target (N, H, W) int64)`` and honours
``ignore_index`` exactly; ``build_loss(cfg.loss, class_weights, num_classes, ignore_index)``
turns a configs/loss/*.yaml into a CompositeLoss whose forward returns
``{"loss": weighted sum, <term>: unweighted value}``. Multi-label models (one sigmoid per channel,
target (N, C, H, W) of 0, 1 and ignore_index) use ``build_loss(..., multilabel=True)`` and the
terms of ``MULTILABEL_REGISTRY`` (``multilabel``).
"""

from segtrain.losses.composite import CompositeLoss
from segtrain.losses.cross_entropy import BinaryCrossEntropyLoss, CrossEntropyLoss, OhemCrossEntropyLoss
from segtrain.losses.dice import BinaryDiceLoss, DiceLoss, GeneralizedDiceLoss
from segtrain.losses.factory import LOSS_REGISTRY, MULTILABEL_REGISTRY, build_loss
from segtrain.losses.focal import BinaryFocalLoss, FocalLoss
from segtrain.losses.fused import FocalDiceLoss
from segtrain.losses.lovasz import LovaszSoftmaxLoss
from segtrain.losses.multilabel import MultilabelBCELoss, MultilabelDiceLoss, MultilabelFocalLoss
from segtrain.losses.tversky import TverskyLoss

__all__ = [
    "LOSS_REGISTRY",
    "MULTILABEL_REGISTRY",
    "BinaryCrossEntropyLoss",
    "BinaryDiceLoss",
    "BinaryFocalLoss",
    "CompositeLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalDiceLoss",
    "FocalLoss",
    "GeneralizedDiceLoss",
    "LovaszSoftmaxLoss",
    "MultilabelBCELoss",
    "MultilabelDiceLoss",
    "MultilabelFocalLoss",
    "OhemCrossEntropyLoss",
    "TverskyLoss",
    "build_loss",
]
