"""Early stopping: patience in evaluations, min_delta in metric units, on any monitored metric; the stop is
recorded and a resumed run stays stopped."""

import json
from dataclasses import dataclass

import pytest

import segtrain.training.engine as engine
from segtrain.checkpoint import load_checkpoint
from segtrain.config import compose_config
from segtrain.train import train
from segtrain.training.early_stopping import EarlyStopping


@dataclass
class _State:
    early_best: float | None = None
    evals_without_progress: int = 0


def _stops(scores, **kw) -> int | None:
    """The 1-based evaluation at which ``scores`` stop the run, or None."""
    rule, state = EarlyStopping(**kw), _State()
    for n, score in enumerate(scores, start=1):
        if rule.update(state, score):
            return n
    return None


def test_patience_counts_evaluations_without_progress_beyond_min_delta():
    # max: 0.50 best; 0.52 is progress (> 0.01); 0.525, 0.529 are not (best stays 0.52); stop at the 2nd of those.
    assert _stops([0.50, 0.52, 0.525, 0.529, 0.9], patience=2, min_delta=0.01) == 4
    # Small gains add up against the best that counted: 0.505, 0.509 no; 0.515 beats 0.50 by 0.015: progress.
    assert _stops([0.50, 0.505, 0.509, 0.515, 0.516, 0.517], patience=3, min_delta=0.01) is None
    assert _stops([1.0, 0.9, 0.95, 0.91], patience=2, min_delta=0.05, mode="min") == 4
    assert _stops([0.5, float("nan"), float("nan")], patience=2) == 3  # NaN is never progress
    assert _stops([float("nan"), 0.5, 0.5], patience=2) is None  # ... and never the best
    assert _stops([0.5, 0.5], patience=1) == 2  # equal is not progress


def test_a_run_stops_at_the_expected_evaluation_and_a_resume_does_not_train_further(tmp_path, monkeypatch, caplog):
    """Monitor val/dice/spot (a per-class metric), planted values per evaluation: stop after the 4th."""
    planted = iter([0.30, 0.40, 0.42, 0.41, 0.90, 0.95])
    evaluate = engine.evaluate

    def planted_evaluate(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        result.metrics["dice"][2] = next(planted)  # class 2 = spot
        return result

    monkeypatch.setattr(engine, "evaluate", planted_evaluate)
    overrides = ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.max_steps=null", "trainer.epochs=6",
                 "trainer.monitor=val/dice/spot", "trainer.early_stopping.patience=2",
                 "trainer.early_stopping.min_delta=0.05"]
    run = tmp_path / "run"
    train(compose_config(overrides), run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["epochs"] == 4  # 4 steps per epoch; evaluations 3 and 4 < 0.40 + 0.05
    assert metrics["early_stop"].startswith("val/dice/spot has not improved by more than 0.05 on 0.4 for 2 evaluations")
    assert metrics["best"]["step"] == 12 and metrics["best"]["val/dice/spot"] == pytest.approx(0.42)
    with caplog.at_level("INFO", logger="segtrain.train"):
        train(compose_config(overrides + ["trainer.resume=auto"]), run)
    assert "stopped early at step 16" in caplog.text
    assert load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"] == 16
    assert json.loads((run / "metrics.json").read_text())["steps"] == 16


def test_early_stopping_values_are_checked_first(tmp_path):
    for bad, message in [("trainer.early_stopping.patience=0", "patience=0: expected null"),
                         ("trainer.early_stopping.min_delta=-0.1", "min_delta=-0.1: expected a number >= 0")]:
        with pytest.raises(ValueError, match=message):
            train(compose_config(["debug=fast", f"dataset.root={tmp_path / 'data'}", bad]), tmp_path / "run")
        assert not (tmp_path / "run").exists()
