"""Multi-label losses: one independent sigmoid per channel, functional forms and their modules.

``logits`` (N, C, *spatial) and ``target`` of the same shape, integer (uint8 or int64), holding
0 (negative), 1 (positive) or ``ignore_index`` (``None``: none are ignored). Ignore is per entry:
a channel may be ignored at a pixel where the others train. An ignored entry changes nothing, and
its logit gets a gradient of exactly zero; a batch without a valid entry gives a connected 0.
Every channel is a foreground, so there is no background channel to drop. The math runs in
float32 with autocast off (``float32_math``), like the softmax losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segtrain.losses.base import LossModule
from segtrain.losses.functional import check_non_negative, float32_math, focal_modulator, safe_divide
from segtrain.losses.functional_overlap import _class_mean, _dice_coefficient

__all__ = [
    "MultilabelBCELoss",
    "MultilabelDiceLoss",
    "MultilabelFocalLoss",
    "multilabel_bce",
    "multilabel_dice",
    "multilabel_focal",
]

_ChannelValues = torch.Tensor | Sequence[float]


# ---------------------------------------------------------------------------------------------
# shared checks


def check_multilabel(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes and values; return float32 logits, the float32 {0, 1} target (0 at ignored
    entries) and the valid mask, all (N, C, *spatial)."""
    if logits.ndim < 2 or tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"multi-label loss needs logits (N, C, *spatial) and a target of the same shape (one 0/1 mask per "
            f"channel); got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"multi-label target must be an integer tensor of 0, 1 and ignore_index, got {target.dtype}")
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = target.masked_fill(~valid, 0)
    if safe.numel() > 0 and safe.device.type == "cpu":
        # One pass instead of unique() over the whole batch. Not on an accelerator, where it would stall every step
        # on a host read: there the targets come from the data path's unpacking, which makes only these values.
        low, high = (int(v) for v in torch.stack(safe.aminmax()).tolist())
        if low < 0 or high > 1:
            raise ValueError(f"multi-label target must hold 0, 1 or ignore_index={ignore_index}; found values in "
                             f"[{low}, {high}] outside the ignored entries")
    # float() is a no-op for float32 logits and keeps a module cast with .double() working.
    return logits.float(), safe.float(), valid


def _per_channel(name: str, values: _ChannelValues, logits: torch.Tensor) -> torch.Tensor:
    """A (C,) option as float32 on the logits' device."""
    values = torch.as_tensor(values, dtype=torch.float32, device=logits.device)
    if tuple(values.shape) != (logits.shape[1],):
        raise ValueError(f"{name} must have shape (C,) = ({logits.shape[1]},) for logits {tuple(logits.shape)}, "
                         f"got shape {tuple(values.shape)}")
    return values


def _broadcast_channels(name: str, values: _ChannelValues, logits: torch.Tensor) -> torch.Tensor:
    """A (C,) option shaped (C, 1, ...) so that it broadcasts over (N, C, *spatial)."""
    return _per_channel(name, values, logits).reshape(-1, *([1] * (logits.ndim - 2)))


def _valid_mean(loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``loss`` over the valid entries; multiplying (not indexing) gives ignored ones a zero gradient."""
    return safe_divide((loss * valid).sum(), valid.sum().float())


def check_alpha(alpha: float | _ChannelValues | None) -> None:
    """alpha is None, or a float or per-channel values, each in [0, 1]."""
    if alpha is None:
        return
    values = torch.as_tensor(alpha, dtype=torch.float32)
    if values.ndim > 1 or not ((values >= 0) & (values <= 1)).all():  # also rejects NaN
        raise ValueError(f"alpha must be None, a float in [0, 1] or (C,) values in [0, 1], got {alpha!r}")


# ---------------------------------------------------------------------------------------------
# functional forms


@float32_math
def multilabel_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: _ChannelValues | None = None,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over the valid (pixel, channel) entries.

    ``pos_weight`` (C,) multiplies the positive term of each channel, as in
    F.binary_cross_entropy_with_logits, broadcast over N and space.
    """
    logits, t, valid = check_multilabel(logits, target, ignore_index)
    if pos_weight is not None:
        pos_weight = _broadcast_channels("pos_weight", pos_weight, logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight, reduction="none")
    return _valid_mean(bce, valid)


@float32_math
def multilabel_focal(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | _ChannelValues | None = None,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Sigmoid focal loss per entry, alpha_t (1 - p_t)^gamma BCE (torchvision's sigmoid_focal_loss),
    mean over valid entries.

    alpha_t = alpha_c for a positive, 1 - alpha_c for a negative; ``alpha`` is one float for all
    channels or (C,) values, ``None`` turns the balancing off (gamma=0 is then plain BCE).
    """
    check_non_negative("gamma", gamma)
    if not (torch.is_tensor(alpha) and alpha.device.type != "cpu"):  # a device tensor: checked where it was made
        check_alpha(alpha)
    logits, t, valid = check_multilabel(logits, target, ignore_index)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    # 1 - p_t = sigmoid(-x) for a positive, sigmoid(x) for a negative; straight from the logit, because
    # 1 - sigmoid(x) rounds to 0 for confident positives.
    loss = focal_modulator(torch.sigmoid((1 - 2 * t) * logits), gamma) * bce
    if alpha is not None:
        scalar = torch.as_tensor(alpha).ndim == 0
        alpha_c = float(alpha) if scalar else _broadcast_channels("alpha", alpha, logits)
        loss = (alpha_c * t + (1 - alpha_c) * (1 - t)) * loss
    return _valid_mean(loss, valid)


@float32_math
def multilabel_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1e-5,
    batch: bool = True,
    squared: bool = False,
    weight: _ChannelValues | None = None,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """1 - (weighted) mean over channels of the soft Dice of sigmoid p and the 0/1 target.

    Ignored entries are left out of the intersection and of both cardinalities. ``batch`` sums
    over N and space per channel, else per (image, channel) and then averages over images;
    ``squared`` uses p^2 and g^2 in the denominator; ``weight`` (C,) makes the channel mean
    sum(w_c D_c) / sum(w_c).
    """
    check_non_negative("smooth", smooth)
    logits, t, valid = check_multilabel(logits, target, ignore_index)
    if weight is not None:
        weight = _per_channel("weight", weight, logits)
    probs = torch.sigmoid(logits) * valid
    per_channel = _dice_coefficient(probs, t, smooth, batch, squared)  # (C,) or (N, C); t is 0 where ignored
    return 1 - _class_mean(per_channel, weight)


# ---------------------------------------------------------------------------------------------
# modules


class MultilabelBCELoss(LossModule):
    """Sigmoid BCE per channel, mean over valid entries; ``weight`` (C,) is the positive-class weight
    of each channel (``pos_weight``), which the class-weight strategies give per channel."""

    def __init__(self, weight: _ChannelValues | None = None, ignore_index: int | None = 255) -> None:
        super().__init__(weight=weight, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multilabel_bce(logits, target, self.weight, self.ignore_index)


class MultilabelFocalLoss(LossModule):
    """Sigmoid focal loss per channel, mean over valid entries; see ``multilabel_focal``.

    A positive-class ``weight`` w_c becomes alpha_c = w_c / (1 + w_c), so that positives weigh
    w_c times the negatives (alpha / (1 - alpha) = w_c); ``alpha`` is a fixed float instead.
    """

    def __init__(self, gamma: float = 2.0, weight: _ChannelValues | None = None, alpha: float | None = None,
                 ignore_index: int | None = 255) -> None:
        check_non_negative("gamma", gamma)
        if weight is not None and alpha is not None:
            raise ValueError(f"MultilabelFocalLoss takes the positive-class weight or alpha={alpha!r}, not both: the "
                             f"weight sets alpha = w / (1 + w) per channel (use_class_weights: false to keep alpha)")
        if alpha is not None and not isinstance(alpha, (int, float)):
            raise ValueError(f"alpha must be None or a float in [0, 1], got {alpha!r}; per-channel alpha comes from "
                             f"the class weights")
        check_alpha(alpha)
        super().__init__(gamma=gamma, weight=weight, alpha=alpha, ignore_index=ignore_index)

    def channel_alpha(self) -> torch.Tensor | float | None:
        """alpha as the focal loss uses it: w / (1 + w) per channel from the weight, else the fixed float (or None)."""
        return self.alpha if self.weight is None else self.weight / (1 + self.weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multilabel_focal(logits, target, self.gamma, self.channel_alpha(), self.ignore_index)


class MultilabelDiceLoss(LossModule):
    """1 - mean over channels of the soft sigmoid Dice; the multi-label counterpart of DiceLoss.

    The class weights of a run never reach it: in multi-label mode they are each channel's present/absent ratio
    (``compute_channel_weights``), a pos_weight, not a channel's share of a mean (a 1% channel's 50 would make the
    Dice nearly that channel's alone). ``channel_weight`` (C,) sets the channel mean's weights by hand."""

    def __init__(self, smooth: float = 1e-5, batch: bool = True, squared: bool = False,
                 channel_weight: _ChannelValues | None = None, ignore_index: int | None = 255) -> None:
        check_non_negative("smooth", smooth)
        super().__init__(smooth=smooth, batch=batch, squared=squared, channel_weight=channel_weight,
                         ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multilabel_dice(logits, target, self.smooth, self.batch, self.squared, self.channel_weight,
                               self.ignore_index)
