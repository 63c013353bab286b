"""A run stopped by a signal (SIGTERM as SLURM sends it, SIGUSR2 as submitit does) through the real entry
point: the documented exit code, last.pt at the step it stopped, and a resume that ends where the
uninterrupted run ends."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segtrain.build import build_model
from segtrain.checkpoint import load_checkpoint
from segtrain.config import compose_config
from segtrain.distributed import parameters_digest
from segtrain.signals import STOPPED_EXIT_CODE, StopSignals
from segtrain.train import train

ROOT = Path(__file__).resolve().parents[1]


def _digest(cfg, checkpoint: Path) -> str:
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return parameters_digest(model)


@pytest.mark.slow
def test_sigusr2_mid_run_stops_at_a_step_and_resume_ends_identical(tmp_path):
    common = ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.epochs=3", "trainer.max_steps=null",
              "trainer.log_every=1"]
    cfg = compose_config(common)
    train(cfg, tmp_path / "full")  # 8 images, batch 2: 4 steps per epoch, 12 in all
    full_final = json.loads((tmp_path / "full/metrics.json").read_text())["final"]
    # SIGUSR2 here, SIGTERM to one rank under torchrun (tests/test_distributed.py): one handler for both.
    for signame in ("SIGUSR2",):
        run = tmp_path / signame
        proc = subprocess.Popen([sys.executable, "-m", "segtrain", *common, f"hydra.run.dir={run}"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # the start-up summary comes after the handlers are in place
            lines.append(line)
            if "checkpoints in" in line:
                break
        time.sleep(0.5)
        proc.send_signal(getattr(signal, signame))
        lines.append(proc.communicate(timeout=300)[0])
        log = "".join(lines)
        assert proc.returncode == STOPPED_EXIT_CODE, log
        step = load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"]
        assert 0 < step < 12 and f"stopped by {signame} at step {step}" in log, log
        assert not (run / "metrics.json").exists()
        train(compose_config(common + ["trainer.resume=auto"]), run)
        assert load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"] == 12
        assert _digest(cfg, run / "checkpoints/last.pt") == _digest(cfg, tmp_path / "full/checkpoints/last.pt")
        assert json.loads((run / "metrics.json").read_text())["final"] == full_final


def test_a_second_ctrl_c_interrupts_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested() == "SIGINT"  # the first one only sets the flag
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before
