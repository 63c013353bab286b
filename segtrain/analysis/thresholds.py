"""Multi-label calibration: one temperature shared by every channel's sigmoid, and a threshold per channel.

A multi-label model decides each channel on its own, ``sigmoid(z_c / T) > t_c``. Written as a bias,
``sigmoid(z_c / T + b_c) > 0.5`` with ``b_c = -logit(t_c)``, the thresholds go where a softmax model's decision
bias goes (``calibration.LogitCalibration``: ``logits / T + bias``), so evaluate, predict and export apply them
without knowing they are thresholds; the checkpoint records both forms.

Channels do not compete, so each threshold is tuned alone, exactly, on a pixel sample: channel c seen as two
classes with logits ``[0, z_c]`` is ``decision.tune_bias``'s problem (predicted present exactly when
``z_c + b_1 > b_0``, ties absent, as the sigmoid rule has them up to float rounding at p = 0.5), and its grid
search gives the bias ``b_1 - b_0``; the calibrated checkpoint is then measured on the whole split as deployed.
``decision.objective``: ``mDice`` / ``mIoU`` tune every channel for its own Dice / IoU (which also maximises their
mean); ``dice/<c>``, ``iou/<c>``, ``recall/<c>@precision>=<p>`` tune channel c alone and leave the others at 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segtrain.analysis.decision import Objective, parse_objective, tune_bias
from segtrain.metrics import channel_scores


@dataclass(frozen=True)
class ChannelObjective:
    """What to tune per channel: ``channels`` (indices) each by ``per_channel[c]`` (an Objective of two-class
    matrices, absent/present); ``__call__`` scores (..., C, 2, 2) matrices: the mean over the tuned channels."""

    text: str
    channels: list[int]
    per_channel: dict[int, Objective]

    def __call__(self, matrices: torch.Tensor) -> torch.Tensor:
        scores = [self.per_channel[c](matrices[..., c, :, :]) for c in self.channels]
        return torch.stack(scores, -1).mean(-1)


def parse_channel_objective(text: str, class_names: Sequence[str]) -> ChannelObjective:
    """``decision.objective`` for a multi-label model; an unknown metric or channel is an error naming the options."""
    names = list(class_names)
    if text in ("mDice", "mIoU"):
        metric = "dice" if text == "mDice" else "iou"
        per_channel = {c: parse_objective(f"{metric}/{name}", ["absent", name]) for c, name in enumerate(names)}
        return ChannelObjective(text, list(range(len(names))), per_channel)
    parse_objective(text, names)  # the same options and the same error as a softmax model's
    for c, name in enumerate(names):  # the channel the objective names: its metric on the channel's two classes
        for prefix in (f"dice/{name}", f"iou/{name}", f"recall/{name}@"):
            if text == prefix or (prefix.endswith("@") and text.startswith(prefix)):
                return ChannelObjective(text, [c], {c: parse_objective(text, ["absent", name])})
    raise AssertionError(text)  # parse_objective accepted it, so one channel matched


def sample_entries(logits: torch.Tensor, labels: torch.Tensor, channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P', 2) two-class logits ``[0, z_c]`` and (P',) labels of channel ``channel``'s labelled entries."""
    keep = labels[:, channel] >= 0
    z = logits[keep, channel]
    return torch.stack([torch.zeros_like(z), z], 1), labels[keep, channel]


def tune_thresholds(logits: torch.Tensor, labels: torch.Tensor, objective: ChannelObjective
                    ) -> tuple[torch.Tensor, float, float]:
    """(bias (C,), objective at b = 0, objective at the bias) on (P, C) temperature-scaled logits and their (P, C)
    labels (1 present, 0 absent, -1 ignored)."""
    bias = torch.zeros(logits.shape[1])
    start, best = [], []
    for c in objective.channels:
        two_class, truth = sample_entries(logits, labels, c)
        b, before, after = tune_bias(two_class, truth, objective.per_channel[c])
        bias[c] = float(b[1] - b[0])
        start.append(before)
        best.append(after)
    return bias, sum(start) / len(start), sum(best) / len(best)


def thresholds_of(bias: torch.Tensor | Sequence[float]) -> list[float]:
    """Each channel's threshold on its temperature-scaled probability: t = sigmoid(-b)."""
    return [1.0 / (1.0 + math.exp(float(b))) for b in bias]


# The temperature's range. Decisions are float32 sigmoid(z / T + b) > 0.5 (what predict and an exported graph
# compute); with T far above this a logit of 0.1 comes within float32 rounding of p = 0.5 and the "calibration" would
# switch channels off. The NLL is convex in 1 / T, so the bounded optimum is the unbounded one clipped.
TEMPERATURE_RANGE = (1e-2, 1e2)


def fit_shared_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T in ``TEMPERATURE_RANGE`` minimising the mean binary NLL of ``sigmoid(logits / T)`` over every labelled
    entry (LBFGS on log T, from T = 1): one temperature for all channels, as one network made them."""
    logits, valid = logits.float(), labels >= 0
    truth = labels.clamp_min(0).float()
    log_t = torch.zeros(1, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits * torch.exp(-log_t), truth, reduction="none")[valid].mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    return min(max(float(torch.exp(log_t.detach())), low), high)


def channel_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean binary NLL of ``sigmoid(logits / temperature)`` over the labelled entries."""
    valid = labels >= 0
    with torch.no_grad():
        loss = F.binary_cross_entropy_with_logits(logits.float() / temperature, labels.clamp_min(0).float(),
                                                  reduction="none")
    return float(loss[valid].mean())


def channel_table(before: torch.Tensor, after: torch.Tensor, class_names: Sequence[str],
                  thresholds: Sequence[float]) -> str:
    """Per channel: its threshold, precision / recall / Dice before and after, from (C, 2, 2) matrices."""
    b, a = channel_scores(before), channel_scores(after)
    width = max(8, *(len(n) for n in class_names))
    head = (f"{'channel':<{width}}  {'thresh':>6}  {'prec':>6} {'recall':>6} {'Dice':>6}  ->  "
            f"{'prec':>6} {'recall':>6} {'Dice':>6}")
    rows = [head, "-" * len(head)]
    for c, name in enumerate(class_names):
        cells = [f"{float(s[m][c]):6.4f}" for s in (b, a) for m in ("precision", "recall", "dice")]
        rows.append(f"{name:<{width}}  {thresholds[c]:6.4f}  {' '.join(cells[:3])}  ->  {' '.join(cells[3:])}")
    return "\n".join(rows)
