"""trainer.ema: the average against a hand computation, its exact resume, and evaluate/predict reading it."""

import json

import pytest
import torch

from segtrain.build import build_model
from segtrain.checkpoint import load_checkpoint, read_for_inference
from segtrain.config import compose_config
from segtrain.distributed import parameters_digest
from segtrain.evaluate import evaluate_checkpoint
from segtrain.metrics import flatten_metrics
from segtrain.train import train
from segtrain.training.ema import WeightEma


def _toy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))


def _set(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.full_like(t, value) if t.dtype.is_floating_point else torch.full_like(t, int(value)))


def test_three_updates_equal_the_hand_computed_average():
    model = _toy()
    ema = WeightEma(model, decay=0.9)
    values = [1.0, 3.0, 7.0]  # the model's every weight and buffer after steps 1, 2, 3
    # Warm-up: d_1 = 0 (a copy), d_2 = 1 - 2^(-2/3), d_3 = 1 - 3^(-2/3); all below 0.9.
    d2, d3 = 1 - 2 ** (-2 / 3), 1 - 3 ** (-2 / 3)
    expected = [1.0, d2 * 1.0 + (1 - d2) * 3.0]
    expected.append(d3 * expected[1] + (1 - d3) * 7.0)
    for value, want in zip(values, expected):
        _set(model, value)
        ema.update(model)
        state = ema.module.state_dict()
        for key, t in state.items():
            if t.dtype.is_floating_point:
                assert torch.allclose(t, torch.full_like(t, want), atol=1e-6), (key, t, want)
            else:  # num_batches_tracked: copied
                assert t.item() == int(value)
    assert ema.updates == 3 and ema.decay_at(10**6) == 0.9
    # Without warm-up the decay is fixed from the first update (which averages with the initial weights).
    fixed = WeightEma(_toy(), decay=0.5, warmup=False)
    start = fixed.module[0].weight.clone()
    follow = _toy()
    _set(follow, 2.0)
    fixed.update(follow)
    assert torch.allclose(fixed.module[0].weight, 0.5 * start + 0.5 * 2.0)
    assert not any(p.requires_grad for p in fixed.module.parameters())
    with pytest.raises(ValueError, match="trainer.ema.decay=1.0"):
        WeightEma(_toy(), decay=1.0)


def _ema_digest(cfg, ckpt: dict) -> str:
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["ema"]["module"])
    return parameters_digest(model)


def test_ema_resumes_exactly_and_evaluate_and_predict_use_it(tmp_path):
    common = ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.epochs=2", "trainer.ema.decay=0.9"]
    cfg = compose_config(common + ["trainer.max_steps=null"])
    train(cfg, tmp_path / "full")
    train(compose_config(common + ["trainer.max_steps=3"]), tmp_path / "resumed")
    train(compose_config(common + ["trainer.max_steps=null", "trainer.resume=auto"]), tmp_path / "resumed")
    full, resumed = (load_checkpoint(tmp_path / d / "checkpoints/last.pt") for d in ("full", "resumed"))
    assert full["ema"]["updates"] == resumed["ema"]["updates"] == 8
    assert _ema_digest(cfg, full) == _ema_digest(cfg, resumed)
    raw = build_model(cfg.model)
    raw.load_state_dict(full["model"])
    assert _ema_digest(cfg, full) != parameters_digest(raw)  # the average is not the last weights

    # The run evaluated its EMA weights; evaluate (and predict, through the same read) takes them from last.pt.
    path = tmp_path / "full/checkpoints/last.pt"
    assert all(torch.equal(a, b) for a, b in zip(read_for_inference(path).weights.values(),
                                                 full["ema"]["module"].values()))
    metrics, names = evaluate_checkpoint(path)
    final = json.loads((tmp_path / "full/metrics.json").read_text())["final"]
    for key in ("val/loss", "val/mDice"):
        assert flatten_metrics(metrics, names, "val")[key] == pytest.approx(final[key], abs=1e-6), key
    raw_metrics, _ = evaluate_checkpoint(path, ["trainer.ema.evaluate=false"])  # raw weights on request
    assert flatten_metrics(raw_metrics, names, "val")["val/loss"] != pytest.approx(final["val/loss"], abs=1e-6)
