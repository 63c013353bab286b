"""``TrainParts``: model, optimizer, schedule, GradScaler, EMA: what an optimizer step changes and a checkpoint
holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from segtrain.training.ema import WeightEma

log = logging.getLogger(__name__)


@dataclass
class TrainParts:
    """What an optimizer step changes. ``model`` is the plain module (its keys are the
    checkpoint's); ``net`` runs the steps: ``model`` inside DDP and/or torch.compile, or itself."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    net: torch.nn.Module | None = None
    ema: WeightEma | None = None  # trainer.ema: updated after every step that updated ``model``

    def __post_init__(self) -> None:
        self.net = self.model if self.net is None else self.net

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # a run without EMA resumed with it: the average starts from these weights
            log.warning("the checkpoint has no EMA weights (trainer.ema was off): the average starts at step "
                        "%s's weights", state.get("train_state", {}).get("step", "?"))
            self.ema.module.load_state_dict(state["model"])

    def eval_net(self, use_ema: bool) -> torch.nn.Module:
        """What evaluation runs: the EMA weights when there are some and ``use_ema``, else ``net``."""
        return self.ema.module if use_ema and self.ema is not None else self.net

    def eval_model(self, use_ema: bool) -> torch.nn.Module:
        """``eval_net``'s weights as a plain module (no DDP or compile wrapper), for one process alone to run."""
        return self.ema.module if use_ema and self.ema is not None else self.model

    def step(self, grad_clip: float | None, update: bool = True) -> bool:
        """One optimizer step (``update=False``: the gradients dropped, only the LR schedule moves on).
        Returns whether the step went without an update, counting the GradScaler's overflow skips."""
        skipped = not update
        if update:
            if grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            # fp16 only: the scaler lowers its scale exactly when it skips the step (it reads its overflow
            # flag to the host in step() anyway, so these two reads add no stall).
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = scale is not None and self.scaler.get_scale() < scale
        if self.ema is not None and not skipped:
            self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return skipped
