"""TrainMeter: the loop's bookkeeping between two log points, against hand computations."""

import math

import pytest
import torch

from segtrain.training.meter import TrainMeter


def _batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (n, 4, 5), generator=g)
    target[:, 0, 0] = 255
    return logits, target


def _soft_dice(batches, c: int) -> float:
    inter = card = 0.0
    for logits, target in batches:
        probs = logits.softmax(1)[:, c]
        valid = target != 255
        truth = (target == c) & valid
        inter += (probs * truth).sum().item()
        card += (probs * valid).sum().item() + truth.sum().item()
    return 2 * inter / card


def test_flush_gives_the_interval_means_and_resets():
    meter = TrainMeter(["a", "b", "c"], ignore_index=255, grad_accum=2)
    batches = [_batch(seed=s) for s in range(4)]
    losses = [(1.0, 0.4), (3.0, 0.2), (5.0, 0.6), (7.0, 0.8)]  # (loss, term "ce") per micro-batch
    for (logits, target), (loss, ce) in zip(batches, losses):
        meter.update({"loss": torch.tensor(loss), "ce": torch.tensor(ce)}, logits, target)
        if meter.images % 4 == 0:  # every second micro-batch: one optimizer step of 2 micro-batches
            meter.step(meter.images // 4)
    interval = meter.flush(lr=0.25, device=torch.device("cpu"))
    # Per step the micro-batch mean, then the mean over the 2 steps: (1+3)/2, (5+7)/2 -> 4.
    assert interval.loss == pytest.approx(4.0) and interval.scalars["train/loss"] == pytest.approx(4.0)
    assert interval.scalars["train/loss/ce"] == pytest.approx(0.5)
    assert interval.scalars["train/lr"] == 0.25 and interval.images == 8
    assert interval.images_per_s == pytest.approx(8 / interval.seconds, rel=1e-6) and interval.seconds > 0
    for c, name in enumerate("abc"):
        assert interval.scalars[f"train/soft_dice/{name}"] == pytest.approx(_soft_dice(batches, c), rel=1e-5)
    assert "train/gpu_memory_gib" not in interval.scalars
    # The next interval starts empty: only its own batch counts.
    meter.update({"loss": torch.tensor(10.0)}, *batches[0])
    meter.update({"loss": torch.tensor(10.0)}, *batches[0])
    meter.step(3)
    again = meter.flush(lr=0.1, device=torch.device("cpu"))
    assert again.loss == pytest.approx(10.0) and again.images == 4 and "train/loss/ce" not in again.scalars
    assert again.scalars["train/soft_dice/a"] == pytest.approx(_soft_dice(batches[:1], 0), rel=1e-5)


def test_a_non_finite_loss_is_reported_with_its_first_step_and_terms_and_a_skipped_one_is_left_out():
    meter = TrainMeter(["a", "b", "c"])
    nan, inf = float("nan"), float("inf")
    for step, (loss, ce, dice) in enumerate([(1.0, 0.5, 0.5), (nan, nan, 0.5), (inf, 0.5, inf)], start=11):
        meter.update({"loss": torch.tensor(loss), "ce": torch.tensor(ce), "dice": torch.tensor(dice)}, *_batch())
        meter.step(step)
    interval = meter.flush(lr=1.0, device=torch.device("cpu"))
    assert math.isnan(interval.loss) and interval.nonfinite_step == 12
    assert interval.nonfinite_terms == ["ce"]  # the terms of step 12, not of the interval (step 13: dice)
    # Skipped steps (trainer.on_nonfinite=skip) stay out of the means and out of the report.
    for step, loss in [(14, 2.0), (15, nan), (16, 4.0)]:
        meter.update({"loss": torch.tensor(loss)}, *_batch())
        meter.step(step, skipped=math.isnan(loss))
    interval = meter.flush(lr=1.0, device=torch.device("cpu"))
    assert interval.loss == pytest.approx(3.0) and interval.nonfinite_step is None
    meter.update({"loss": torch.tensor(nan)}, *_batch())
    meter.step(17, skipped=True)
    interval = meter.flush(lr=1.0, device=torch.device("cpu"))  # nothing kept: no mean, nothing to report
    assert math.isnan(interval.loss) and interval.nonfinite_step is None
