"""The progress bar and the log number epochs alike, also when the run stops inside an epoch."""

from __future__ import annotations

import logging
import re

from segtrain.config import compose_config
from segtrain.train import train
from segtrain.training import engine


def test_bar_and_log_name_the_same_epoch(tmp_path, monkeypatch, caplog):
    bars = []

    class Bar:  # tqdm's interface as train_one_epoch uses it; records what the bar showed
        def __init__(self, total, desc, **kwargs):
            bars.append(desc)

        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(engine, "tqdm", Bar)
    # 8 images in batches of 2: 4 steps an epoch; max_steps=6 stops after 2 of the second epoch's 4 steps.
    overrides = ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.epochs=2", "trainer.max_steps=6",
                 "report.tensorboard_k=0"]
    with caplog.at_level(logging.INFO, logger="segtrain.training.engine"):
        train(compose_config(overrides), tmp_path / "run")
    evaluations = [r.getMessage().split(":\n")[0] for r in caplog.records if r.getMessage().startswith("evaluation ")]
    assert bars == ["epoch 1/2", "epoch 2/2"]
    assert evaluations == ["evaluation after epoch 1/2 (step 4)", "evaluation in epoch 2/2 (step 6, 2 of its 4 steps)"]
    for bar, evaluation in zip(bars, evaluations):  # each evaluation names the epoch its bar showed
        assert re.search(r"epoch \d+/\d+", evaluation).group(0) == bar
