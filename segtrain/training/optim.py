"""Learning-rate schedules, stepped once per optimizer step (not per epoch).

Each schedule is a multiplier on the base LR with an optional linear warm-up, wrapped in a
``LambdaLR`` so its state (the step count) saves and resumes with the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from segtrain.errors import check_count, choice_message

SCHEDULES = ("poly", "cosine", "none")


def _multiplier(name: str, total_steps: int, power: float, min_lr_ratio: float) -> Callable[[int], float]:
    if name == "poly":
        return lambda s: max(1.0 - s / total_steps, 0.0) ** power * (1 - min_lr_ratio) + min_lr_ratio
    if name == "cosine":
        return lambda s: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0)))
    if name == "none":
        return lambda s: 1.0
    raise ValueError(choice_message("scheduler.name", name, SCHEDULES))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str = "poly",
    power: float = 0.9,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR(step) = base_lr * warm-up(step) * schedule(step), with step counted in optimizer steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    decay = _multiplier(name, total_steps, power, min_lr_ratio)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * decay(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class RunLength:
    """How long a run trains: ``total_steps`` (what the LR schedule spans), ``epochs`` (the last may end
    mid-epoch) and ``stop_at`` (``trainer.max_steps`` may stop it earlier; the schedule still spans the total)."""

    total_steps: int
    epochs: int
    stop_at: int


def run_length(epochs: int | None, steps: int | None, max_steps: int | None, steps_per_epoch: int) -> RunLength:
    """``trainer.epochs`` or ``trainer.steps``, exactly one of them, in optimizer steps."""
    if (epochs is None) == (steps is None):
        raise ValueError(f"trainer.epochs={epochs!r} and trainer.steps={steps!r}: set exactly one of the two "
                         "(e.g. trainer.epochs=null trainer.steps=2000, or trainer.steps=null trainer.epochs=50)")
    for key, value in (("trainer.epochs", epochs), ("trainer.steps", steps), ("trainer.max_steps", max_steps)):
        if value is not None:
            check_count(key, value)
    total = steps if steps is not None else epochs * steps_per_epoch
    return RunLength(total, math.ceil(total / steps_per_epoch), min(total, max_steps or total))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases only hurts."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
