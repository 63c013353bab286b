"""The training loop's bookkeeping between two log points: loss terms, soft Dice, images, time.

``update`` runs at every micro-batch on the device and never reads a value back; ``flush``
is the one host sync per interval (under DDP the sums of all ranks), and turns the interval
into the scalars that the progress bar and TensorBoard show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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


class TrainMeter:
    def __init__(self, class_names: list[str], ignore_index: int = 255, grad_accum: int = 1) -> None:
        self.class_names = list(class_names)
        self.grad_accum = grad_accum
        self.soft_dice = SoftDiceTracker(len(class_names), ignore_index)
        self._reset()

    def _reset(self) -> None:
        self.running: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.tick = time.perf_counter()

    def update(self, out: dict[str, torch.Tensor], logits: torch.Tensor, masks: torch.Tensor) -> None:
        """One micro-batch: the loss dict, its logits and targets (all on the device)."""
        for key, value in out.items():
            self.running[key] = self.running.get(key, 0.0) + value.detach().float() / self.grad_accum
        self.soft_dice.update(logits.detach(), masks)
        self.images += logits.shape[0]

    def step(self) -> None:
        """One optimizer step done."""
        self.steps += 1

    def flush(self, lr: float, device: torch.device) -> Interval:
        """The interval since the last flush, as scalars (the mean over its steps and the ranks)."""
        keys = sorted(self.running)
        totals = distributed.all_reduce_sum(torch.stack([self.running[k] for k in keys]))
        values = dict(zip(keys, (totals / (self.steps * distributed.world_size())).tolist()))
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
        self._reset()
        return interval
