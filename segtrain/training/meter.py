"""The training loop's bookkeeping between two log points: loss terms, soft Dice, images, time.

``update`` runs at every micro-batch on the device and never reads a value back; ``flush``
is the one host sync per interval (under DDP the sums of all ranks), and turns the interval
into the scalars that the progress bar and TensorBoard show.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from segtrain import distributed
from segtrain.metrics import SoftDiceTracker


@dataclass
class Interval:
    """One flushed interval: the scalars to log, and what it adds to the run's totals."""

    scalars: dict[str, float]
    loss: float
    images: int  # over all ranks
    seconds: float
    images_per_s: float
    nonfinite_step: int | None = None  # the first step of the interval whose loss was not finite (any rank)
    nonfinite_terms: list[str] = field(default_factory=list)  # the loss terms not finite at that step


class TrainMeter:
    def __init__(self, class_names: list[str], ignore_index: int = 255, grad_accum: int = 1,
                 multilabel: bool = False) -> None:
        self.class_names = list(class_names)
        self.grad_accum = grad_accum
        self.soft_dice = SoftDiceTracker(len(class_names), ignore_index, multilabel)
        self._reset()

    def _reset(self) -> None:
        self.running: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}  # the optimizer step in progress
        self.steps = 0
        self.kept = 0  # steps whose losses are in ``running`` (skipped ones are not)
        self.images = 0
        # On the device: the first step with a non-finite loss, and which of the (sorted) terms were not finite then.
        self.first_nonfinite: torch.Tensor | int = -1
        self.nonfinite_terms: torch.Tensor | bool = False
        self.tick = time.perf_counter()

    def update(self, out: dict[str, torch.Tensor], logits: torch.Tensor, masks: torch.Tensor) -> None:
        """One micro-batch: the loss dict, its logits and targets (all on the device)."""
        for key, value in out.items():
            self.pending[key] = self.pending.get(key, 0.0) + value.detach().float() / self.grad_accum
        self.soft_dice.update(logits.detach(), masks)
        self.images += logits.shape[0]

    def step_loss(self) -> torch.Tensor:
        """The loss of the optimizer step in progress (a device scalar)."""
        return self.pending["loss"]

    def step(self, number: int, skipped: bool = False) -> None:
        """Optimizer step ``number`` done; a skipped one's losses stay out of the interval's means. The first
        step whose loss is not finite is recorded on the device (no host read)."""
        self.steps += 1
        self.last_step = number
        if not skipped:
            keys = sorted(self.pending)
            bad = ~torch.isfinite(torch.stack([self.pending[k] for k in keys]))  # (terms,)
            first = bad[keys.index("loss")] & (torch.as_tensor(self.first_nonfinite) < 0)
            self.first_nonfinite = torch.where(first, number, self.first_nonfinite)
            self.nonfinite_terms = torch.where(first, bad, self.nonfinite_terms)
            for key, value in self.pending.items():
                self.running[key] = self.running.get(key, 0.0) + value
            self.kept += 1
        self.pending = {}

    def flush(self, lr: float, device: torch.device) -> Interval:
        """The interval since the last flush, as scalars (the mean over its steps and the ranks)."""
        keys = sorted(self.running)
        if keys:
            totals = distributed.all_reduce_sum(torch.stack([self.running[k] for k in keys]))
            values = dict(zip(keys, (totals / (self.kept * distributed.world_size())).tolist()))
        else:  # every step of the interval was skipped
            values = {"loss": float("nan")}
        images = self.images * distributed.world_size()
        seconds = time.perf_counter() - self.tick
        speed = images / max(seconds, 1e-9)
        dice = self.soft_dice.compute_and_reset()
        scalars = {"train/loss" if k == "loss" else f"train/loss/{k}": v for k, v in values.items()}
        scalars.update({"train/lr": lr, "train/images_per_s": speed})
        scalars.update({f"train/soft_dice/{c}": v for c, v in zip(self.class_names, dice.tolist())})
        if device.type == "cuda":
            scalars["train/gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        interval = Interval(scalars, values["loss"], images, seconds, speed)
        if keys and not math.isfinite(values["loss"]):  # sums over ranks: a NaN on any rank is seen by all
            first = int(self.first_nonfinite)  # -1 when it was another rank's: then the interval's means tell
            if first >= 0:
                flags = self.nonfinite_terms.tolist()
                interval.nonfinite_step, bad = first, [k for k, flag in zip(keys, flags) if flag]
            else:
                interval.nonfinite_step, bad = self.last_step, [k for k in keys if not math.isfinite(values[k])]
            interval.nonfinite_terms = [k for k in bad if k != "loss"]
        self._reset()
        return interval
