"""Where trainer.early_stopping would have stopped finished runs, from the evaluations they logged.

The rule is segtrain.training.early_stopping.EarlyStopping itself, applied to each run's TensorBoard values of
the monitored metric; up to the stop an early-stopping run takes exactly the steps of the run without it
(same seed, same schedule), so the replay gives the evaluation it would stop at, the value it would end
with, and the share of the training it would save (of the run's measured wall time).

    python scripts/early_stopping_replay.py outputs/studies/ema/0 ... --monitor val/dice/spot \\
        --patience 1 2 3 --min-delta 0 0.005 0.02
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segtrain.training.early_stopping import EarlyStopping


@dataclass
class _State:
    early_best: float | None = None
    evals_without_progress: int = 0


def logged(run: Path, tag: str) -> list[tuple[int, float]]:
    values: dict[int, float] = {}
    for events in sorted((run / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return sorted(values.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--monitor", default="val/dice/spot")
    parser.add_argument("--mode", default="max", choices=("max", "min"))
    parser.add_argument("--patience", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--min-delta", type=float, nargs="+", default=[0.0, 0.005, 0.02])
    args = parser.parse_args()
    print(f"| run | patience | min_delta | stops at step | of | {args.monitor} at stop | at the end | "
          "training saved |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        values = logged(run, args.monitor)
        wall = json.loads((run / "metrics.json").read_text())["train_time_s"]
        last_step, last_value = values[-1]
        for patience in args.patience:
            for delta in args.min_delta:
                rule, state = EarlyStopping(patience, delta, args.mode, args.monitor), _State()
                stop = next(((step, v) for step, v in values if rule.update(state, v)), None)
                step, value = stop or (last_step, last_value)
                saved = 1 - step / last_step
                print(f"| {run} | {patience} | {delta:g} | {step if stop else '-'} | {last_step} | {value:.4f} | "
                      f"{last_value:.4f} | {100 * saved:.0f}% ({saved * wall / 60:.1f} min) |")


if __name__ == "__main__":
    main()
