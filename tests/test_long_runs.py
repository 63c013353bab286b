"""A run stopped by a signal (SIGTERM as SLURM sends it, SIGUSR2 as submitit does) through the real entry
point: the documented exit code, last.pt at the step it stopped, and a resume that ends where the
uninterrupted run ends."""

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segtrain.build import build_data, build_loaders, build_model
from segtrain.checkpoint import load_checkpoint
from segtrain.config import compose_config
from conftest import train_then_signal
from segtrain.distributed import parameters_digest
from segtrain.train import train
from segtrain.training.nonfinite import NonFiniteLoss
from segtrain.training.signals import STOPPED_EXIT_CODE, StopSignals

ROOT = Path(__file__).resolve().parents[1]


def _digest(cfg, checkpoint: Path) -> str:
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return parameters_digest(model)


# `python -m segtrain`, killed with SIGKILL (no handler runs, as on an OOM kill or a node failure) in the
# middle of optimizer step KILL_AT: its update done, the step not finished, nothing written.
KILLED_ENTRY = """
import os, signal, sys
import segtrain.training.engine as engine

step, updates = engine.TrainParts.step, []

def step_then_die(self, *args, **kwargs):
    updates.append(step(self, *args, **kwargs))
    if len(updates) == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return updates[-1]

engine.TrainParts.step = step_then_die
from segtrain.__main__ import main
main()
"""


@pytest.mark.slow
def test_sigusr2_or_kill_9_mid_run_then_resume_ends_identical(tmp_path, caplog):
    """SIGUSR2: the documented exit status within one step, last.pt at that step. kill -9 with
    trainer.checkpoint_every=5: at most 5 steps lost. Both resume to the uninterrupted run's weights and metrics."""
    common = ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.epochs=3", "trainer.max_steps=null",
              "trainer.log_every=1", "trainer.checkpoint_every=5"]
    cfg = compose_config(common)
    train(cfg, tmp_path / "full")  # 8 images, batch 2: 4 steps per epoch, 12 in all
    full_final = json.loads((tmp_path / "full/metrics.json").read_text())["final"]

    def resume_and_compare(run: Path, step: int) -> None:
        caplog.clear()
        with caplog.at_level("INFO", logger="segtrain.checkpoint"):
            train(compose_config(common + ["trainer.resume=auto"]), run)
        assert f"resumed from {run / 'checkpoints/last.pt'} at epoch {step // 4}, step {step}" in caplog.text
        assert load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"] == 12
        assert _digest(cfg, run / "checkpoints/last.pt") == _digest(cfg, tmp_path / "full/checkpoints/last.pt")
        assert json.loads((run / "metrics.json").read_text())["final"] == full_final

    # SIGUSR2 here, SIGTERM to one rank under torchrun (tests/test_distributed.py): one handler for both.
    run = tmp_path / "SIGUSR2"
    returncode, log = train_then_signal(common, run, ROOT)
    assert returncode == STOPPED_EXIT_CODE, log
    step = load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"]
    assert 0 < step < 12 and f"stopped by SIGUSR2 at step {step}" in log, log
    assert not (run / "metrics.json").exists()
    resume_and_compare(run, step)

    # kill -9 during step 11: last.pt is step 10's (checkpoint_every=5, mid-epoch), one step lost.
    entry = tmp_path / "killed_entry.py"
    entry.write_text(KILLED_ENTRY)
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(entry), *common, f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "KILL_AT": "11"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"] == 10
    resume_and_compare(run, 10)


def test_a_second_ctrl_c_interrupts_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested() == "SIGINT"  # the first one only sets the flag
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before


def _planted_nan(monkeypatch, at: set[int]) -> None:
    """The run's loss returns NaN (loss and its dice term, gradients NaN too) at the training calls ``at``
    (1-based, one call per optimizer step here; evaluation calls, without gradients, are not counted)."""
    import segtrain.train as train_module

    build = train_module.build_loss_fn
    calls = itertools.count(1)

    def planted_build(*args, **kwargs):
        loss_fn = build(*args, **kwargs)

        def planted(logits, masks):
            out = loss_fn(logits, masks)
            if torch.is_grad_enabled() and next(calls) in at:
                out = {**out, "loss": out["loss"] * float("nan"), "dice": out["dice"] * float("nan")}
            return out
        return planted

    monkeypatch.setattr(train_module, "build_loss_fn", planted_build)


def _nan_overrides(tmp_path, *extra):
    # 8 images, batch 2: 4 steps in the one epoch; a checkpoint every step or two, all kept.
    return ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.max_steps=null", "trainer.log_every=10",
            "trainer.keep_last=5", *extra]


def _weights(path: Path) -> list[torch.Tensor]:
    return list(load_checkpoint(path)["model"].values())


def test_nonfinite_stop_names_the_step_and_terms_and_writes_nothing_after_it(tmp_path, monkeypatch):
    _planted_nan(monkeypatch, {2})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"not finite at step 2 \(non-finite: dice\)") as err:
        train(compose_config(_nan_overrides(tmp_path, "trainer.checkpoint_every=1")), run)
    assert err.value.step == 2
    # Step 2 would have written last.pt (mid-epoch, log_every=10): the loss is read first, so it never was.
    last = load_checkpoint(run / "checkpoints/last.pt")
    assert last["train_state"]["step"] == 1 and all(torch.isfinite(w).all() for w in _weights(run / "checkpoints/last.pt"))


def test_nonfinite_skip_drops_the_update_counts_it_and_stops_after_max_skipped(tmp_path, monkeypatch):
    _planted_nan(monkeypatch, {2})
    run = tmp_path / "skip"
    train(compose_config(_nan_overrides(tmp_path, "trainer.checkpoint_every=1", "trainer.on_nonfinite=skip")), run)
    ckpts = run / "checkpoints"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["skipped_steps"] == 1
    # Step 2 left the parameters (and the optimizer's moments) as step 1 had them; step 3 trained on. BatchNorm's
    # running statistics are not parameters: the forward pass of a skipped step still moves them.
    step1, step2, step3 = ({k: v for k, v in load_checkpoint(ckpts / f"step_{n}.pt")["model"].items()
                            if "running_" not in k and "num_batches" not in k} for n in (1, 2, 3))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)
    assert not all(torch.equal(step2[k], step3[k]) for k in step2)
    assert load_checkpoint(ckpts / "step_2.pt")["scheduler"]["last_epoch"] == 2  # the LR schedule moved on
    assert all(torch.isfinite(w).all() for w in _weights(ckpts / "last.pt"))
    monkeypatch.undo()
    _planted_nan(monkeypatch, {2, 3})
    with pytest.raises(NonFiniteLoss, match="2 steps skipped in a row"):
        train(compose_config(_nan_overrides(tmp_path, "trainer.on_nonfinite=skip", "trainer.max_skipped=2")),
              tmp_path / "skip2")


def test_nonfinite_rollback_returns_to_the_last_checkpoint_with_a_lower_lr(tmp_path, monkeypatch, caplog):
    _planted_nan(monkeypatch, {3})  # the retried step 3 is the 4th training call: finite
    run = tmp_path / "rollback"
    overrides = _nan_overrides(tmp_path, "trainer.checkpoint_every=2", "trainer.on_nonfinite=rollback",
                               "scheduler=none")
    with caplog.at_level("WARNING", logger="segtrain.training.nonfinite"):
        train(compose_config(overrides), run)
    assert "not finite by step 4: back to step 2 (the last checkpoint), LR x 0.5" in caplog.text
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["rollbacks"] == 1
    last = load_checkpoint(run / "checkpoints/last.pt")
    lr = compose_config(overrides).optimizer.lr
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == [lr * 0.5] * 2
    assert last["scheduler"]["base_lrs"] == [lr * 0.5] * 2  # stays lowered after a resume
    assert all(torch.isfinite(w).all() for w in _weights(run / "checkpoints/last.pt"))
    # Steps 1-2 are the same before and after the rollback: step_2.pt was written once, before the NaN.
    assert load_checkpoint(run / "checkpoints/step_2.pt")["train_state"]["rollbacks"] == 0


def test_starting_the_loaders_leaves_the_global_generator_alone(tmp_path):
    """Dropout draws from torch's global generator; a loader must not, or a run resumed mid-epoch (which starts
    its loader at another point of the run) takes other dropout masks than the uninterrupted run."""
    cfg = compose_config(["debug=fast", f"dataset.root={tmp_path / 'data'}"])
    train_loader, val_loader, _ = build_loaders(build_data(cfg.dataset), cfg, torch.device("cpu"))
    before = torch.get_rng_state()
    next(iter(train_loader)), next(iter(val_loader))
    assert torch.equal(torch.get_rng_state(), before)
