"""Loss math as pure functions; the nn.Modules in this package only hold their arguments.

Every multiclass function takes ``logits`` (N, C, *spatial) and ``target`` (N, *spatial)
integer class indices, where ``ignore_index`` marks unlabelled pixels (``None``: none are).
An ignored pixel changes nothing: not the value, not another pixel's gradient, and its own
logits get a gradient of exactly zero. A batch without a valid pixel gives 0, still
connected to the graph. Probabilities and reductions run in float32 with autocast off,
whatever dtype the logits arrive in.

Overlap losses (Dice, Tversky, Lovasz) live in ``functional_overlap``; this module holds
the pixel-wise ones and the helpers both share.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from segtrain.errors import check_choice

__all__ = [
    "as_class_weights",
    "binary_focal_loss",
    "cross_entropy",
    "focal_loss",
    "ohem_cross_entropy",
]

FOCAL_NORMALIZE = ("weights", "pixels")
_Fn = TypeVar("_Fn", bound=Callable[..., torch.Tensor])


# ---------------------------------------------------------------------------------------------
# shared helpers


def float32_math(fn: _Fn) -> _Fn:
    """Run ``fn(logits, ...)`` with autocast off on the logits' device.

    The functions cast logits to float32 themselves; switching autocast off as well keeps
    every op inside in float32 (autocast would silently run a matmul or einsum in bf16).
    """

    @functools.wraps(fn)
    def wrapper(logits: torch.Tensor, *args, **kwargs):
        device_type = logits.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(logits, *args, **kwargs)
        return fn(logits, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def as_class_weights(weight: torch.Tensor | Sequence[float] | None) -> torch.Tensor | None:
    """Validate per-class weights and return them as a float32 (C,) tensor (or None)."""
    if weight is None:
        return None
    weight = torch.as_tensor(weight).detach().to(torch.float32).clone()
    if weight.ndim != 1 or weight.numel() == 0:
        raise ValueError(f"class weight must be a non-empty 1-D tensor of shape (C,), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all() or (weight < 0).any() or weight.sum() <= 0:
        raise ValueError(f"class weight must be finite, >= 0 and not all zero, got {weight.tolist()}")
    return weight


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")



def check_multiclass(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check shapes and return float32 logits, int64 target and float32 weight."""
    if logits.ndim < 2:
        raise ValueError(f"logits must be (N, C, *spatial), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}; "
            f"expected (N, *spatial) = {expected}"
        )
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if weight is not None and tuple(weight.shape) != (logits.shape[1],):
        raise ValueError(f"class weight has shape {tuple(weight.shape)} but logits have C={logits.shape[1]} classes")
    # float() is a no-op for the usual float32 buffer, and keeps a module cast with .double() working.
    return logits.float(), target.long(), None if weight is None else weight.float()


def valid_and_safe_target(target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid-pixel mask, and the target with ignored pixels replaced by class 0.

    one_hot and gather cannot take 255; class 0 is a harmless stand-in because every use
    of the safe target is multiplied by (or selected with) the mask.
    """
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool), target
    valid = target != ignore_index
    return valid, torch.where(valid, target, 0)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, or numerator itself (always 0 here) where denominator == 0.

    The denominator is replaced before dividing, not the quotient after: a torch.where on
    the quotient would still backpropagate 1/0 = inf into the unused branch and give NaN.
    """
    return numerator / torch.where(denominator != 0, denominator, torch.ones_like(denominator))


def focal_modulator(one_minus_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p) ** gamma with a finite gradient where 1 - p == 0.

    For gamma < 1 the derivative gamma * x ** (gamma - 1) is infinite at x = 0 (and
    overflows for subnormal x), and the focal loss multiplies it by log p = 0 there: NaN.
    Below the smallest normal float the term is set to 0 through a base of 1, so its
    gradient is 0 (the true limit of the focal loss's gradient) and the value moves by
    at most tiny ** gamma.
    """
    if gamma == 0:
        return torch.ones_like(one_minus_p)  # 0 ** 0 is 1, but its pow gradient is 0 * inf
    if gamma >= 1:
        return one_minus_p.pow(gamma)
    usable = one_minus_p >= torch.finfo(one_minus_p.dtype).tiny
    base = torch.where(usable, one_minus_p, torch.ones_like(one_minus_p))
    return torch.where(usable, base.pow(gamma), torch.zeros_like(one_minus_p))


def _pixel_weights(safe_target: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """a_t per pixel: weight[target] (1 without weights), 0 at ignored pixels."""
    if weight is None:
        return valid.float()
    return weight[safe_target] * valid


def _target_log_prob(logits: torch.Tensor, safe_target: torch.Tensor) -> torch.Tensor:
    """log p_t from the unweighted softmax, shape (N, *spatial)."""
    return F.log_softmax(logits, dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# multiclass pixel-wise losses


@float32_math
def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """F.cross_entropy's weighted mean over valid pixels, but 0 (not NaN) when none is valid."""
    logits, target, weight = check_multiclass(logits, target, weight)
    valid, safe_target = valid_and_safe_target(target, ignore_index)
    # -100 is F.cross_entropy's own "no ignore" default; a real class index is never negative.
    total = F.cross_entropy(
        logits, target, weight=weight, ignore_index=-100 if ignore_index is None else ignore_index,
        reduction="sum", label_smoothing=label_smoothing,
    )
    # F.cross_entropy's "mean" divides by the same sum of weight[target]; it is 0/0 without valid pixels.
    return safe_divide(total, _pixel_weights(safe_target, valid, weight).sum())


@float32_math
def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Cross-entropy over hard pixels only (online hard example mining, as in PSPNet/OCNet).

    Keeps every valid pixel whose target probability p_t is below ``thresh``, and at least
    the ``min_kept`` valid pixels with the lowest p_t (ties may keep a few more), so that
    a batch the model already fits well still trains on its worst pixels.
    """
    logits, target, weight = check_multiclass(logits, target, weight)
    valid, safe_target = valid_and_safe_target(target, ignore_index)
    log_p_t = _target_log_prob(logits, safe_target)
    with torch.no_grad():  # the selection is a mask, not part of the gradient
        # 2 is above every probability, so ignored pixels sort after all valid ones.
        p_t = log_p_t.exp().masked_fill(~valid, 2.0)
        keep = valid & (p_t < thresh)
        if min_kept > 0 and p_t.numel() > 0:
            kth = p_t.flatten().kthvalue(min(min_kept, p_t.numel())).values
            keep |= valid & (p_t <= kth)
    a_t = _pixel_weights(safe_target, keep, weight)
    return safe_divide(-(a_t * log_p_t).sum(), a_t.sum())


@float32_math
def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
    normalize: str = "weights",
) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017): per valid pixel -a_t (1 - p_t)^gamma log p_t.

    p_t comes from the unweighted softmax; a_t = weight[target] (1 without weights).
    ``normalize="weights"`` divides by sum(a_t), so gamma=0 is exactly weighted
    cross-entropy; ``"pixels"`` divides by the number of valid pixels.
    """
    check_non_negative("gamma", gamma)
    check_choice("normalize", normalize, FOCAL_NORMALIZE)
    logits, target, weight = check_multiclass(logits, target, weight)
    valid, safe_target = valid_and_safe_target(target, ignore_index)
    log_p_t = _target_log_prob(logits, safe_target)
    # -expm1(log p) keeps 1 - p_t accurate near p_t = 1, where 1 - exp() cancels to 0.
    modulator = focal_modulator(-torch.expm1(log_p_t), gamma)
    a_t = _pixel_weights(safe_target, valid, weight)
    total = -(a_t * modulator * log_p_t).sum()
    return safe_divide(total, a_t.sum() if normalize == "weights" else valid.sum().float())


# ---------------------------------------------------------------------------------------------
# binary (one-channel sigmoid) losses


def check_binary(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept (N, 1, *spatial) or (N, *spatial) logits and targets; return both as float32 (N, *spatial)."""
    if logits.ndim >= 2 and logits.shape[1] == 1 and logits.ndim == target.ndim + 1:
        logits = logits.squeeze(1)  # (N, *spatial)
    elif logits.ndim >= 2 and logits.shape[1] == 1 and target.ndim == logits.ndim and target.shape[1] == 1:
        logits, target = logits.squeeze(1), target.squeeze(1)  # (N, *spatial)
    if logits.shape != target.shape:
        raise ValueError(
            f"binary loss needs one-channel logits (N, 1, *spatial) or (N, *spatial) and a target of "
            f"the same spatial shape; got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    return logits.float(), target.float()


@float32_math
def binary_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss, mean over valid pixels; torchvision.ops.sigmoid_focal_loss's formula.

    Per pixel alpha_t (1 - p_t)^gamma BCE(logit, t), alpha_t = alpha for t = 1 and 1 - alpha
    for t = 0 (``alpha=None``: no balancing). With gamma=0 and alpha=None it is plain BCE.
    """
    check_non_negative("gamma", gamma)
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
    logits, target = check_binary(logits, target)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    t = target.masked_fill(~valid, 0.0)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    # 1 - p_t from sigmoid(-x) directly: 1 - sigmoid(x) rounds to 0 for confident positives.
    one_minus_p_t = t * torch.sigmoid(-logits) + (1 - t) * torch.sigmoid(logits)
    loss = focal_modulator(one_minus_p_t, gamma) * bce
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return safe_divide((loss * valid).sum(), valid.sum().float())
