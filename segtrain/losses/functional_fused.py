"""Focal (or cross-entropy) and soft Dice from one softmax, with an analytic backward.

``CompositeLoss`` (through ``fused.FocalDiceLoss``) calls ``focal_dice_loss`` when it holds a FocalLoss (or an unsmoothed
CrossEntropyLoss) and a DiceLoss. Computed apart, the two terms each build a softmax, Dice a
one-hot target, and their autograd graphs keep several (N, C, H, W) tensors; here one
softmax buffer serves both values (log p_t is taken per pixel, see _log_target_prob), and the
backward writes the one (N, C, H, W) gradient. On CPU every such tensor, and every pass over
it, is both memory and time: with few classes the per-pixel passes (gather, lookups, class
sums) weigh as much as the softmax, so each one here is the cheapest form measured.
The values and gradients are those of the separate terms (tests/test_losses.py checks both,
with ignored pixels and class weights).

Per valid pixel i and class c: p = softmax(z), t the target, l = log p_t, m = 1 - p_t,
a = weight[t] (1 without weights), mod(m) the focal modulator m^gamma.

    pixel term  F = -sum_i a_i mod(m_i) l_i / A,   A = sum_i a_i  (or the valid-pixel count)
                dF/dz_ic = h_i ([c = t_i] - p_ic),  h_i = a_i (l_i p_t mod'(m_i) - mod(m_i)) / A
    Dice term   L = 1 - mean_c D_c(I_c, S_c),  I_c = sum_i p_ic [t_i = c],  S_c = sum_i p_ic
                dL/dp_ic = alpha_c [t_i = c] + beta_c,  alpha = dL/dI, beta = dL/dS,
                and through the softmax dL/dz_ic = p_ic (q_ic - sum_k p_ik q_ik) with q = dL/dp.

With upstream gradients gF and gD both collapse to one expression:

    grad_ic = p_ic (gD beta_c - u_i) + [c = t_i] d_i,
    d_i = gF h_i + gD alpha_t p_t,   u_i = d_i + gD sum_k beta_k p_ik.

The Dice tail from (C,) sums to the loss reuses ``functional_overlap``'s code through autograd
on those few numbers, so its edge cases (smooth=0, absent classes, weights, background) are the
same code as DiceLoss's. Not fused: the squared Dice denominator, label smoothing, double backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from segtrain.errors import check_choice
from segtrain.losses import functional as LF
from segtrain.losses.functional_overlap import _class_mean, _ratio_or_one

__all__ = ["focal_dice_loss"]

# p_t below this is recomputed from a log-softmax: 2^-100, far above float32's subnormal range.
_UNDERFLOW = 2.0**-100


def class_sums(values: torch.Tensor, safe_target: torch.Tensor, num_classes: int, scatter: bool) -> torch.Tensor:
    """sum of ``values`` (N, *spatial) over the pixels of each target class, per image: (N, C).

    A scatter-add is one cheap pass on CPU; on a GPU it would serialise on atomics into C bins
    (and add in no fixed order), so there the pixels are compared with each class instead.
    """
    n = values.shape[0]
    values, index = values.reshape(n, -1), safe_target.reshape(n, -1)  # (N, P)
    if scatter:
        # The CPU kernel splits its work by rows: with one long row per image and two threads it ran
        # ~4x slower than with 16 or more shorter rows (scripts/bench_losses.py), so each image's
        # pixels are cut into up to 64 rows whose sums are added after.
        rows = math.gcd(values.shape[1], 64)
        out = values.new_zeros(n * rows, num_classes)
        out.scatter_add_(1, index.reshape(n * rows, -1), values.reshape(n * rows, -1))
        return out.view(n, rows, num_classes).sum(1)
    classes = torch.arange(num_classes, device=values.device).view(1, -1, 1)
    return ((index.unsqueeze(1) == classes) * values.unsqueeze(1)).sum(2)  # (N, C)


def _lookup(table: torch.Tensor, safe_target: torch.Tensor) -> torch.Tensor:
    """table[..., target] per pixel for a (C,) or (N, C) table: (N, *spatial).

    A gather from the table expanded to (N, C) is a single cheap pass; ``table[target]``
    goes through advanced indexing, several times slower on CPU.
    """
    n = safe_target.shape[0]
    return table.expand(n, -1).gather(1, safe_target.reshape(n, -1)).view_as(safe_target)


def _gather_classes(values: torch.Tensor, safe_target: torch.Tensor) -> torch.Tensor:
    """values[n, target[n, ...], ...] for (N, C, *spatial) values: (N, *spatial).

    Gathers over a (N, C, pixels) view, which is about twice as fast on CPU as over the
    (N, C, H, W) tensor; the view exists for contiguous and channels_last layouts (any other
    layout is copied).
    """
    n, c = values.shape[:2]
    return values.reshape(n, c, -1).gather(1, safe_target.reshape(n, 1, -1)).view_as(safe_target)


def _log_target_prob(p_t: torch.Tensor, logits: torch.Tensor, safe_target: torch.Tensor) -> torch.Tensor:
    """log p_t from the softmax's p_t, and from a log-softmax of the logits where p_t is too small.

    Taking the log of the float32 softmax loses nothing log_softmax keeps while p_t is a normal
    number well above underflow (both carry the rounding of the sum of exponentials, ~1e-7);
    one softmax pass and a log per pixel are cheaper than log_softmax, its exp and a second
    gather. Below _UNDERFLOW (a logit gap beyond ~69) p_t loses digits and then becomes 0,
    so those few pixels, e.g. of saturated logits, get the exact log-softmax instead.
    """
    log_p_t = torch.log(p_t)
    if p_t.numel() and p_t.min() < _UNDERFLOW:  # a min is a fraction of the cost of a comparison and an any()
        where = (p_t < _UNDERFLOW).nonzero(as_tuple=True)  # (image, *position) indices of the few pixels
        class_last = logits.movedim(1, -1)[where]  # (K, C)
        log_p_t[where] = class_last.log_softmax(-1).gather(1, safe_target[where].unsqueeze(1)).squeeze(1)
    return log_p_t


def _pixels_view(values: torch.Tensor) -> torch.Tensor | None:
    """(N, C, *spatial) as an (N, C, pixels) view, or None where the layout has none."""
    try:
        return values.view(*values.shape[:2], -1)
    except RuntimeError:
        return None


def _pixel_term(log_p_t: torch.Tensor, p_t: torch.Tensor, a_t: torch.Tensor, gamma: float, want_grad: bool):
    """sum_i a_i mod(m_i) l_i (the focal numerator, negated) and, if wanted, -a_i df/dl per pixel.

    f = -mod(m) l, so -df/dl = mod(m) - l p_t mod'(m), with dm/dl = -(expm1(l) + 1) = -p_t; for
    0 < gamma < 1 mod' is 0 where focal_modulator cut the term to 0 (m below the smallest normal),
    as autograd gets it through that helper. ``p_t`` may be 0 where ``a_t`` is.

    m is 1 - p_t, not -expm1(l) as in focal_loss: near p_t = 1 both inherit the same ~6e-8
    absolute rounding of the softmax's sum (l is -log of that sum there), and the subtraction
    is exact for p_t >= 0.5 (Sterbenz), so the cheaper form gives the same m to within that.
    """
    if gamma == 0:  # cross-entropy: the modulator is 1
        return torch.dot(a_t.flatten(), log_p_t.flatten()), a_t if want_grad else None
    one_minus_p = torch.rsub(p_t, 1)
    weighted = LF.focal_modulator(one_minus_p, gamma).mul_(a_t)
    total = torch.dot(weighted.flatten(), log_p_t.flatten())
    if not want_grad:
        return total, None
    slope = p_t * log_p_t
    if gamma < 1:
        cut = one_minus_p < torch.finfo(one_minus_p.dtype).tiny
        slope.mul_(one_minus_p.pow_(gamma - 1).masked_fill_(cut, 0))
    elif gamma != 1:
        slope.mul_(one_minus_p if gamma == 2 else one_minus_p.pow_(gamma - 1))
    return total, torch.addcmul(weighted, slope, a_t, value=-gamma)


def _dice_from_sums(intersection, prob_sums, counts, smooth, include_background, weight):
    """DiceLoss's value from its per-class sums ((C,) or (N, C)), exactly as functional_overlap.dice_loss ends."""
    per_class = _ratio_or_one(2 * intersection + smooth, prob_sums + counts + smooth)
    if not include_background:
        per_class = per_class[..., 1:]
        weight = None if weight is None else weight[1:]
    return 1 - _class_mean(per_class, weight)


class _FocalDice(torch.autograd.Function):
    """(focal, dice) of float32 logits; the backward is the closed form in the module docstring."""

    @staticmethod
    def forward(ctx, logits, safe_target, valid, gamma, focal_weight, normalize, smooth, batch,
                include_background, dice_weight):
        num_classes = logits.shape[1]
        valid_f = valid.to(logits.dtype)
        probs = F.softmax(logits, dim=1)
        if _pixels_view(probs) is None:  # the backward works on (N, C, pixels) views
            probs = probs.contiguous()
        p_t = _gather_classes(probs, safe_target)  # (N, *spatial)
        log_p_t = _log_target_prob(p_t, logits, safe_target)
        # Zero at ignored pixels: Dice sums the probabilities as they are, and the backward multiplies
        # by them, which keeps the ignored pixels' gradient exactly 0.
        probs.mul_(valid_f.unsqueeze(1))
        p_t.mul_(valid_f)

        scatter = logits.device.type == "cpu"
        counts = class_sums(valid_f, safe_target, num_classes, scatter)  # (N, C)
        a_t = valid_f if focal_weight is None else _lookup(focal_weight, safe_target).mul_(valid_f)
        focal_total, focal_grad = _pixel_term(log_p_t, p_t, a_t, gamma, ctx.needs_input_grad[0])
        # sum(a_t) from the class counts: the same sum, without another pass over the pixels.
        counted = counts.sum(0)
        denominator = (counted * focal_weight).sum() if normalize == "weights" and focal_weight is not None \
            else counted.sum()
        focal = LF.safe_divide(-focal_total, denominator)

        intersection = class_sums(p_t, safe_target, num_classes, scatter)  # (N, C)
        prob_sums = probs.sum(tuple(range(2, logits.ndim)))  # (N, C)
        if batch:
            intersection, prob_sums, counts = intersection.sum(0), prob_sums.sum(0), counted  # (C,)
        with torch.enable_grad():  # a graph over a few numbers: dL/dI and dL/dS for the backward
            intersection.requires_grad_(True)
            prob_sums.requires_grad_(True)
            dice = _dice_from_sums(intersection, prob_sums, counts, smooth, include_background, dice_weight)
        if ctx.needs_input_grad[0]:
            d_intersection, d_prob_sums = torch.autograd.grad(dice, (intersection, prob_sums))
            dice_t = _lookup(d_intersection, safe_target).mul_(p_t)  # alpha_t p_t
            # focal_grad is -a df/dl; h = that times -1 / denominator.
            focal_scale = -1 / torch.where(denominator != 0, denominator, 1.0)
            ctx.save_for_backward(probs, safe_target, focal_grad, focal_scale, dice_t, d_prob_sums)
        return focal, dice.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_focal, grad_dice):
        probs, safe_target, focal_grad, focal_scale, dice_t, d_prob_sums = ctx.saved_tensors
        shape, (n, c) = probs.shape, probs.shape[:2]
        # On (N, C, pixels) views (forward made sure probs has one): the broadcasts and the scatter
        # over them ran up to twice as fast on CPU as over (N, C, H, W).
        probs, safe_target = _pixels_view(probs), safe_target.view(n, -1)
        beta = (grad_dice * d_prob_sums).view(-1, c, *(1,) * (probs.ndim - 2))  # (1 or N, C, 1, ..)
        grad = probs * beta  # (N, C, *pixels)
        # Saved tensors stay untouched: a graph kept with retain_graph=True may run this again.
        d = torch.mul(focal_grad, grad_focal * focal_scale).addcmul_(dice_t, grad_dice).view_as(safe_target)
        u = grad.sum(1).add_(d)
        grad.addcmul_(probs, u.unsqueeze(1), value=-1)
        grad.scatter_add_(1, safe_target.unsqueeze(1), d.unsqueeze(1))
        return grad.view(shape), *(None,) * 9


@LF.float32_math
def focal_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    focal_weight: torch.Tensor | None = None,
    normalize: str = "weights",
    smooth: float = 1e-5,
    batch: bool = True,
    include_background: bool = True,
    dice_weight: torch.Tensor | None = None,
    ignore_index: int | None = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal_loss(...), dice_loss(..., squared=False)) with one softmax; gamma=0 is cross-entropy.

    Arguments are those of ``functional.focal_loss`` and ``functional_overlap.dice_loss``, each
    term with its own class weight. Supports one backward through the graph (no create_graph).
    """
    LF.check_non_negative("gamma", gamma)
    check_choice("normalize", normalize, LF.FOCAL_NORMALIZE)
    LF.check_non_negative("smooth", smooth)
    if logits.ndim < 3:
        raise ValueError(f"focal_dice_loss needs logits (N, C, *spatial) with spatial dims, got {tuple(logits.shape)}")
    if not include_background and logits.shape[1] < 2:
        raise ValueError(f"include_background=False needs at least 2 classes, logits have {logits.shape[1]}")
    _, _, dice_weight = LF.check_multiclass(logits, target, dice_weight)
    logits, target, focal_weight = LF.check_multiclass(logits, target, focal_weight)
    valid, safe_target = LF.valid_and_safe_target(target, ignore_index)
    return _FocalDice.apply(logits, safe_target, valid, gamma, focal_weight, normalize, smooth, batch,
                            include_background, dice_weight)
