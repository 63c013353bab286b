"""Overlap (region) loss math: Dice, generalized Dice, Tversky, Lovasz-softmax.

Same conventions as ``functional``: logits (N, C, *spatial), target (N, *spatial) with
``ignore_index``; softmax probabilities and the one-hot target are both zeroed at ignored
pixels, so those pixels add nothing to any sum. Sums run over the whole batch unless a
``batch=False`` option says per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segtrain.losses.functional import (check_binary, check_multiclass, check_non_negative, float32_math,
                                        focal_modulator, safe_divide, valid_and_safe_target)

__all__ = [
    "binary_dice_loss",
    "dice_loss",
    "generalized_dice_loss",
    "lovasz_softmax_loss",
    "tversky_loss",
]


def _masked_probs_and_onehot(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax p and one-hot g, both (N, C, *spatial) and zero at ignored pixels, and the valid mask."""
    logits, target, _ = check_multiclass(logits, target)
    valid, safe_target = valid_and_safe_target(target, ignore_index)
    mask = valid.unsqueeze(1)  # (N, 1, *spatial)
    # Multiplying by the mask (not indexing) keeps shapes static and gives ignored logits a zero gradient.
    probs = logits.softmax(dim=1) * mask
    onehot = F.one_hot(safe_target, logits.shape[1]).movedim(-1, 1).float() * mask  # (N, C, *spatial)
    return probs, onehot, valid


def _sum_dims(ndim: int, batch: bool) -> tuple[int, ...]:
    """Spatial dims, plus the batch dim when the sums run over the whole batch."""
    spatial = tuple(range(2, ndim))
    return (0, *spatial) if batch else spatial


def _ratio_or_one(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 1 (perfect overlap of two empty sets) where denominator == 0.

    Only reachable with smooth=0; the denominator is replaced before dividing so that the
    unused branch does not backpropagate inf.
    """
    empty = denominator == 0
    ratio = numerator / torch.where(empty, torch.ones_like(denominator), denominator)
    return torch.where(empty, torch.ones_like(ratio), ratio)


def _dice_coefficient(
    probs: torch.Tensor, truth: torch.Tensor, smooth: float, batch: bool, squared: bool
) -> torch.Tensor:
    """Soft Dice per class, (C,) when batch else (N, C)."""
    dims = _sum_dims(probs.ndim, batch)
    intersection = (probs * truth).sum(dims)
    if squared:
        denominator = probs.square().sum(dims) + truth.square().sum(dims)
    else:
        denominator = probs.sum(dims) + truth.sum(dims)
    return _ratio_or_one(2 * intersection + smooth, denominator + smooth)


def _class_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last (class) dim, weighted as sum(w_c v_c) / sum(w_c), then over images."""
    if weight is None:
        return values.mean()
    return safe_divide((values * weight).sum(-1).mean(), weight.sum())


@float32_math
def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1e-5,
    batch: bool = True,
    squared: bool = False,
    include_background: bool = True,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """1 - (weighted) mean over classes of D_c = (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth).

    ``squared`` uses p^2 and g^2 in the denominator; ``batch=False`` computes D per image and
    averages over images too; ``include_background=False`` drops class 0 (and its weight).
    """
    check_non_negative("smooth", smooth)
    if not include_background and logits.shape[1] < 2:
        raise ValueError(f"include_background=False needs at least 2 classes, logits have {logits.shape[1]}")
    logits, target, weight = check_multiclass(logits, target, weight)
    probs, onehot, _ = _masked_probs_and_onehot(logits, target, ignore_index)
    per_class = _dice_coefficient(probs, onehot, smooth, batch, squared)  # (C,) or (N, C)
    if not include_background:
        per_class = per_class[..., 1:]
        weight = None if weight is None else weight[1:]
    return 1 - _class_mean(per_class, weight)


@float32_math
def binary_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1e-5,
    batch: bool = True,
    squared: bool = False,
    include_background: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Sigmoid Dice for one-channel logits: 1 - D of the foreground.

    ``include_background=True`` averages it with the Dice of the background (1 - p vs
    1 - t); off by default because the large, easy background dilutes the gradient.
    """
    check_non_negative("smooth", smooth)
    logits, target = check_binary(logits, target)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    probs = (torch.sigmoid(logits) * valid).unsqueeze(1)  # (N, 1, *spatial)
    truth = target.masked_fill(~valid, 0.0).unsqueeze(1)
    if include_background:
        mask = valid.unsqueeze(1)
        probs = torch.cat([(1 - probs) * mask, probs], dim=1)  # (N, 2, *spatial)
        truth = torch.cat([(1 - truth) * mask, truth], dim=1)
    return 1 - _dice_coefficient(probs, truth, smooth, batch, squared).mean()


@float32_math
def generalized_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5, ignore_index: int | None = 255
) -> torch.Tensor:
    """Generalized Dice (Sudre et al. 2017) over the whole batch, w_c = 1 / (sum g_c)^2.

    A class absent from the batch would get an infinite weight; it gets the largest finite
    one instead. The weights are then normalised to sum to 1: the ratio is unchanged, but
    raw 1 / count^2 is ~1e-12 on real images and would let ``smooth`` dominate.
    """
    check_non_negative("smooth", smooth)
    probs, onehot, _ = _masked_probs_and_onehot(logits, target, ignore_index)
    dims = _sum_dims(probs.ndim, batch=True)
    counts = onehot.sum(dims)  # (C,)
    present = counts > 0
    weights = 1 / counts.clamp_min(1).square()  # counts are integers, so >= 1 where present
    weights = torch.where(present, weights, weights.masked_fill(~present, 0).amax())
    weights = safe_divide(weights, weights.sum())
    intersection = ((probs * onehot).sum(dims) * weights).sum()
    union = ((probs.sum(dims) + counts) * weights).sum()
    return 1 - _ratio_or_one(2 * intersection + smooth, union + smooth)


@float32_math
def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 1.0,
    smooth: float = 1e-5,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Mean over classes of (1 - TI_c)^gamma, TI_c = (TP + s) / (TP + alpha FP + beta FN + s), over the batch.

    alpha weighs false positives, beta false negatives (beta > alpha favours recall, which
    helps small classes); alpha = beta = 0.5 is Dice. gamma != 1 is the focal Tversky loss.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("smooth", smooth)):
        check_non_negative(name, value)
    probs, onehot, _ = _masked_probs_and_onehot(logits, target, ignore_index)
    dims = _sum_dims(probs.ndim, batch=True)
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)  # probs are 0 at ignored pixels, so those add nothing
    fn = ((1 - probs) * onehot).sum(dims)
    index = _ratio_or_one(tp + smooth, tp + alpha * fp + beta * fn + smooth)
    return focal_modulator((1 - index).clamp_min(0), gamma).mean()


def _lovasz_gradient(fg_sorted: torch.Tensor, valid_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss for errors sorted descending, (C, P).

    Ignored pixels (valid 0, fg 0) add to neither cumulative sum, so wherever they sort they
    leave every other pixel's gradient unchanged and get 0 themselves.
    """
    fg_total = fg_sorted.sum(dim=1, keepdim=True)
    intersection = fg_total - fg_sorted.cumsum(dim=1)
    union = fg_total + (valid_sorted - fg_sorted).cumsum(dim=1)
    # union counts pixels, so it is >= 1 wherever it is non-zero.
    jaccard = 1 - intersection / union.clamp_min(1)
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


@float32_math
def lovasz_softmax_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = 255) -> torch.Tensor:
    """Lovasz-softmax (Berman et al. 2018) over the batch, averaged over classes present in the valid target."""
    probs, onehot, valid = _masked_probs_and_onehot(logits, target, ignore_index)
    num_classes = probs.shape[1]
    probs = probs.movedim(1, 0).reshape(num_classes, -1)  # (C, N*H*W)
    onehot = onehot.movedim(1, 0).reshape(num_classes, -1)  # (C, N*H*W)
    errors = (onehot - probs).abs()
    errors_sorted, order = errors.sort(dim=1, descending=True)
    fg_sorted = onehot.gather(1, order)
    valid_sorted = valid.reshape(1, -1).float().expand(num_classes, -1).gather(1, order)
    per_class = (errors_sorted * _lovasz_gradient(fg_sorted, valid_sorted)).sum(dim=1)  # (C,)
    present = onehot.sum(dim=1) > 0
    return safe_divide((per_class * present).sum(), present.sum().float())
