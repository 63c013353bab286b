"""What a run does when the training loss is not finite: ``trainer.on_nonfinite``.

    stop      raise ``NonFiniteLoss`` naming the step and the loss terms; nothing is written after that
              step, so the checkpoints on disk are the last good ones. No per-step host read: the loop
              notices at its next read of the loss (log_every, a checkpoint, the epoch's end).
    skip      read one flag per step (all ranks agree) and drop the step: no optimizer update, the LR
              schedule moves on; counted as train/skipped_steps, and ``max_skipped`` in a row stop the run.
    rollback  go back to the state of the last checkpoint (kept in memory), multiply the LR by
              ``rollback_lr_factor`` and train on from there, at most ``max_rollbacks`` times.

Under fp16 the GradScaler skips steps whose gradients overflow on its own; those are counted in
train/skipped_steps too (they are expected while the scale settles, and never stop a run).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from segtrain.checkpoint import TrainState, rng_state, set_rng_state
from segtrain.errors import check_count

POLICIES = ("stop", "skip", "rollback")

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
    """The training loss (and ``terms`` of it) was NaN or infinite at ``step``."""

    def __init__(self, step: int, terms: list[str], reason: str) -> None:
        super().__init__(f"training loss not finite at step {step} (non-finite: {', '.join(terms) or 'loss'}); "
                         f"{reason}. The checkpoints on disk are from before that step. Options: a lower "
                         "optimizer.lr, trainer.grad_clip, trainer.amp=bf16 instead of fp16, "
                         "trainer.on_nonfinite=skip|rollback")
        self.step, self.terms = step, terms


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    """The training state at a checkpoint, in host memory: what ``rollback`` returns to."""

    parts: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any]

    @classmethod
    def take(cls, parts, state: TrainState) -> Snapshot:
        return cls(_to_cpu(parts.state_dict()), _to_cpu(dataclasses.asdict(state)), _to_cpu(rng_state()))

    def restore(self, parts, state: TrainState, lr_factor: float) -> None:
        """``parts``, ``state`` (in place) and the random generators as they were, then the LR scaled by
        ``lr_factor`` for the rest of the run (the scheduler's base LRs too, so that it stays lowered
        in checkpoints and after a resume). The run's counters of rollbacks and skips are kept."""
        kept = {"rollbacks": state.rollbacks, "skipped_steps": state.skipped_steps}
        parts.load_state_dict(self.parts)
        for key, value in _to_cpu(self.state).items():
            setattr(state, key, value)
        state.__dict__.update(kept)
        set_rng_state(self.rng)
        sched = parts.scheduler
        sched.base_lrs = [lr * lr_factor for lr in sched.base_lrs]
        for group in parts.optimizer.param_groups:
            group["lr"] *= lr_factor
            if "initial_lr" in group:
                group["initial_lr"] *= lr_factor
        sched._last_lr = [group["lr"] for group in parts.optimizer.param_groups]


def roll_back(parts, state: TrainState, snapshot: Snapshot, lr_factor: float, max_rollbacks: int) -> None:
    """``trainer.on_nonfinite=rollback``: back to ``snapshot`` with the LR times ``lr_factor``, or
    ``NonFiniteLoss`` after ``max_rollbacks``."""
    failed_at = state.step
    if state.rollbacks >= max_rollbacks:
        raise NonFiniteLoss(failed_at, [], f"trainer.on_nonfinite=rollback: still not finite after "
                            f"{state.rollbacks} rollbacks (trainer.max_rollbacks)")
    state.rollbacks += 1
    snapshot.restore(parts, state, lr_factor)
    log.warning("training loss not finite by step %d: back to step %d (the last checkpoint), LR x %g (now %.3g); "
                "rollback %d of at most %d", failed_at, state.step, lr_factor,
                parts.scheduler.get_last_lr()[0], state.rollbacks, max_rollbacks)


def check_nonfinite_policy(policy: str, max_skipped: int, rollback_lr_factor: float, max_rollbacks: int) -> None:
    """trainer.on_nonfinite and its numbers, before anything runs."""
    if policy not in POLICIES:
        raise ValueError(f"trainer.on_nonfinite={policy!r}: expected one of {', '.join(POLICIES)}")
    check_count("trainer.max_skipped", max_skipped)
    check_count("trainer.max_rollbacks", max_rollbacks)
    factor = rollback_lr_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ValueError(f"trainer.rollback_lr_factor={factor!r}: expected a number in (0, 1]")
