"""`python -m segtrain.evaluate` scores a checkpoint with the config it was trained with."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from segtrain.evaluate import evaluate_checkpoint, main
from segtrain.metrics import flatten_metrics
from segtrain.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    overrides = ["debug=fast", f"dataset.root={tmp / 'data'}", "trainer.max_steps=4", "trainer.epochs=1"]
    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg, tmp / "run", overrides=overrides)
    return tmp


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_checkpoint_scores_exactly_what_the_run_reported(trained):
    metrics, names = evaluate_checkpoint(trained / "run/checkpoints/last.pt")
    flat = flatten_metrics(metrics, names, "val")
    final = json.loads((trained / "run/metrics.json").read_text())["final"]
    assert flat.keys() == final.keys()
    assert all(_same(flat[k], final[k]) for k in final if k != "val/loss")
    assert flat["val/loss"] == pytest.approx(final["val/loss"], rel=1e-6)


def test_overrides_replace_only_what_they_name(trained):
    on_train, _ = evaluate_checkpoint(trained / "run/checkpoints/last.pt", ["dataset.split=train"])
    on_val, _ = evaluate_checkpoint(trained / "run/checkpoints/last.pt")
    assert on_train["mIoU"] != on_val["mIoU"]  # 8 train images, not the 4 val ones
    # A group override swaps the dataset but keeps the trained model.
    folder, names = evaluate_checkpoint(
        trained / "run/checkpoints/last.pt",
        ["dataset=folder", f"dataset.root={trained / 'data'}", "dataset.num_classes=3"])
    assert names == ["class_0", "class_1", "class_2"]
    assert folder["mIoU"] == on_val["mIoU"]


def test_cli_prints_the_per_class_table(trained):
    proc = subprocess.run([sys.executable, "-m", "segtrain.evaluate",
                           f"checkpoint={trained / 'run/checkpoints/last.pt'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("background", "region", "spot", "mean"):
        assert name in proc.stdout
    printed = json.loads(proc.stdout.split("metrics: ", 1)[1])
    final = json.loads((trained / "run/metrics.json").read_text())["final"]
    assert printed["val/mIoU"] == final["val/mIoU"]


def test_cli_usage_and_missing_checkpoint(tmp_path, capsys):
    assert main([]) == 2
    assert "checkpoint=<path" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.pt: checkpoint not found"):
        main([f"checkpoint={tmp_path / 'nope.pt'}"])
