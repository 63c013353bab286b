"""Early stopping on ``trainer.monitor``, counted in evaluations (``trainer.early_stopping``).

Patience counts evaluations, not epochs: with ``trainer.eval_every=5`` a patience of 3 is 15 epochs.
An evaluation counts as progress only when the monitored value beats the best so far by more than
``min_delta`` (in the metric's units); small gains add up against that best, which moves only on
progress. The monitor may be any logged metric, a per-class one included (``val/dice/spot``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from segtrain.errors import check_count

MONITOR_MODES = ("max", "min")  # trainer.monitor_mode: whether a larger or a smaller value is better


@dataclass(frozen=True)
class EarlyStopping:
    patience: int  # evaluations without progress that end the run
    min_delta: float = 0.0
    mode: str = "max"  # trainer.monitor_mode
    monitor: str = "val/mDice"

    def update(self, state, score: float) -> str | None:
        """Count one evaluation's ``score`` in ``state`` (an ``engine.TrainState``); the reason to stop, if any."""
        best = state.early_best
        gain = math.nan if best is None else (score - best if self.mode == "max" else best - score)
        if best is None or gain > self.min_delta:  # NaN scores never count as progress
            if not math.isnan(score):
                state.early_best, state.evals_without_progress = score, 0
                return None
        state.evals_without_progress += 1
        if state.evals_without_progress < self.patience:
            return None
        return (f"{self.monitor} has not improved by more than {self.min_delta:g} on {best:.4g} for "
                f"{state.evals_without_progress} evaluations (trainer.early_stopping.patience={self.patience})")


def check_early_stopping(patience: int | None, min_delta: float) -> None:
    """trainer.early_stopping.patience (null = off, or >= 1) and min_delta (>= 0), before anything runs."""
    if patience is not None:
        check_count("trainer.early_stopping.patience", patience, "null (off) or a number of evaluations")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
        raise ValueError(f"trainer.early_stopping.min_delta={min_delta!r}: expected a number >= 0, in the metric's "
                         "units")
