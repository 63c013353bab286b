"""Calibration: ECE against torchmetrics, temperature scaling, the decision bias, calibrated checkpoints."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from segtrain.analysis.calibration import (CalibratedModel, LogitCalibration, PixelSample, ReliabilityHistogram,
                                           fit_temperature, nll)
from segtrain.analysis.decision import _matrices_over_grid, confusion, parse_objective, predict, tune_bias


def _logits_and_target(seed: int, n=3, k=4, h=19, w=23, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, h, w, generator=g) * scale
    target = torch.randint(0, k, (n, h, w), generator=g)
    target[:, :3] = 255  # an ignored band
    logits[0, 0, 5, :] = 200.0  # softmax exactly 1.0 in float32: torchmetrics' extra last bin
    return logits, target


def _flat(logits, target):
    valid = target != 255
    return logits.permute(0, 2, 3, 1)[valid], target[valid]  # (P, K), (P,)


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_equals_torchmetrics_top_label_and_per_class(seed):
    logits, target = _logits_and_target(seed)
    histogram = ReliabilityHistogram(4, bins=15)
    histogram.update(logits[:1], target[:1])  # two batches: the sums carry over
    histogram.update(logits[1:], target[1:])
    flat, labels = _flat(logits, target)
    probs = flat.softmax(dim=1)
    assert (probs.max(dim=1).values == 1.0).any()
    expected = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")(flat, labels)
    assert histogram.ece() == pytest.approx(float(expected), abs=1e-6)
    for c in range(4):
        per_class = BinaryCalibrationError(n_bins=15, norm="l1")(probs[:, c], (labels == c).long())
        assert float(histogram.class_ece()[c]) == pytest.approx(float(per_class), abs=1e-6)


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_temperature_recovers_a_known_over_or_under_confidence(factor):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300_000, 4, generator=g) * 2  # calibrated logits: labels drawn from their softmax
    labels = torch.multinomial(z.softmax(dim=1), 1, generator=g)[:, 0]
    temperature = fit_temperature(z * factor, labels)
    assert temperature == pytest.approx(factor, rel=0.02)
    assert nll(z * factor, labels, temperature) < nll(z * factor, labels)


def test_pixel_sample_is_fixed_by_its_seed_and_skips_ignored_pixels():
    logits, target = _logits_and_target(0)
    samples = []
    for _ in range(2):
        sample = PixelSample(per_image=50, seed=7)
        sample.add(logits[:2], target[:2])
        sample.add(logits[2:], target[2:])
        samples.append(sample.tensors())
    (a, la), (b, lb) = samples
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert len(la) == 150 and (la != 255).all()
    flat, labels = _flat(logits, target)
    # Every sampled row is one of the split's labelled pixels, with its own label.
    rows = {tuple(r.tolist()): int(y) for r, y in zip(flat, labels)}
    assert all(rows[tuple(r.tolist())] == int(y) for r, y in zip(a, la))


def test_grid_matrices_equal_the_argmax_at_every_grid_value():
    logits, target = _logits_and_target(2)
    flat, labels = _flat(logits, target)
    bias = torch.tensor([0.3, -0.2, 0.0, 0.1])
    values = torch.linspace(-3, 3, 25)
    matrices = _matrices_over_grid(flat, labels, bias, 2, values)
    for g, value in enumerate(values):
        trial = bias.clone()
        trial[2] = value
        assert torch.equal(matrices[g], confusion(labels, predict(flat, trial), 4)), g


@pytest.mark.parametrize("objective", ["mDice", "mIoU", "dice/c3", "iou/c1", "recall/c3@precision>=0.5"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuned_bias_never_lowers_the_objective_on_the_split_it_was_tuned_on(objective, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor([0.7, 0.15, 0.1, 0.05]), 20_000, replacement=True, generator=g)
    logits = torch.randn(20_000, 4, generator=g) * 1.5 + torch.nn.functional.one_hot(labels, 4) * 1.2
    logits[:, 3] -= 1.0  # a rare class predicted too rarely: a bias has something to gain
    score = parse_objective(objective, ["c0", "c1", "c2", "c3"])
    bias, start, best = tune_bias(logits, labels, score)
    assert start == pytest.approx(float(score(confusion(labels, predict(logits, torch.zeros(4)), 4))))
    assert best == pytest.approx(float(score(confusion(labels, predict(logits, bias), 4))))
    assert best >= start
    if objective in ("dice/c3", "mDice"):
        assert best > start + 0.01
    if objective == "dice/c3":
        assert bias[3] - bias[:3].mean() > 0  # the rare class is pushed up


def test_objective_errors_name_the_options():
    with pytest.raises(ValueError, match=r"decision.objective='dice/cat' is not an objective; valid: mDice, mIoU, "
                                         r"dice/a, dice/b"):
        parse_objective("dice/cat", ["a", "b"])
    with pytest.raises(ValueError, match=r"precision must be in \(0, 1\]"):
        parse_objective("recall/a@precision>=1.5", ["a", "b"])


def test_temperature_one_and_zero_bias_change_nothing_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 17, 21)
    calibrated = CalibratedModel(model, LogitCalibration(1.0, [0.0] * 4))
    assert torch.equal(calibrated(x), model(x))
    shifted = CalibratedModel(model, LogitCalibration(3.0, [0.0, 0.5, 0.0, -1.0]))
    expected = model(x) / 3.0 + torch.tensor([0.0, 0.5, 0.0, -1.0]).view(1, 4, 1, 1)
    assert torch.equal(shifted(x), expected)
    with pytest.raises(ValueError, match=r"temperature=0.0: expected a finite number > 0"):
        LogitCalibration(0.0, [0.0])


# ---------------------------------------------------------------- the command, on a trained checkpoint


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def calibrated(trained):
    """``segtrain.calibrate`` with a tuned bias on the shared debug=fast run's last.pt."""
    from segtrain.calibrate import main

    source = trained / "run" / "checkpoints" / "last.pt"
    digest = _sha(source)
    assert main([f"checkpoint={source}", "decision.tune=true", "decision.objective=dice/spot"]) == 0
    return source, source.with_name("last_calibrated.pt"), digest


def test_calibrate_writes_a_new_checkpoint_and_leaves_the_original(calibrated):
    source, target, digest = calibrated
    assert _sha(source) == digest
    entry = torch.load(target, weights_only=True)["calibration"]
    assert entry["temperature"] > 0 and len(entry["bias"]) == 3
    assert entry["fitted_on"]["split"] == "val" and entry["objective"] == "dice/spot"
    assert entry["objective_value"][1] >= entry["objective_value"][0]
    assert entry["nll"][1] <= entry["nll"][0] + 1e-9  # the fitted T minimises the sample's NLL; T = 1 is a candidate


def test_evaluate_refuses_the_calibration_split_unless_told_and_applies_the_calibration(calibrated, trained, capsys):
    from segtrain.evaluate import evaluate_checkpoint, main

    source, target, _ = calibrated
    entry = torch.load(target, weights_only=True)["calibration"]
    assert main([f"checkpoint={target}"]) == 2
    err = capsys.readouterr().err
    assert "was calibrated on" in err and "--same-split-ok" in err
    with pytest.raises(ValueError, match=r"was calibrated on .*val \(segtrain.calibrate\): its score there is optimistic"):
        evaluate_checkpoint(target, report=False)
    metrics, names = evaluate_checkpoint(target, same_split_ok=True, report=False)
    assert metrics["dice"][names.index("spot")].item() == pytest.approx(entry["objective_value"][1], abs=1e-9)
    raw, _ = evaluate_checkpoint(target, ["inference.calibrated=false"], report=False)  # no calibration: allowed
    assert raw["dice"][names.index("spot")].item() == pytest.approx(entry["objective_value"][0], abs=1e-9)
    assert raw["ece"] == pytest.approx(entry["ece"][0], abs=1e-9)  # the same pixels, the same bins
    held_out = [f"dataset.root={trained / 'held_out'}", "dataset.generate.seed=1"]  # other data: no refusal
    assert set(evaluate_checkpoint(target, held_out, report=False)[0]) >= {"ece", "class_ece", "dice"}


def test_predict_applies_the_calibration_and_can_leave_it_out(calibrated, trained):
    from segtrain.data.folder import read_image
    from segtrain.predict import Predictor

    source, target, _ = calibrated
    entry = torch.load(target, weights_only=True)["calibration"]
    image = read_image(sorted((trained / "data" / "images" / "val").glob("*.png"))[0])
    plain = Predictor.from_checkpoint(source, device="cpu")
    x = torch.from_numpy(plain.transform(image=image)["image"]).permute(2, 0, 1).contiguous()[None]
    with torch.no_grad():
        logits = plain.model(x)
    expected = (logits / entry["temperature"] + torch.tensor(entry["bias"]).view(1, -1, 1, 1)).softmax(dim=1)[0]
    got = Predictor.from_checkpoint(target, device="cpu")(image)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    off = Predictor.from_checkpoint(target, ["inference.calibrated=false"], device="cpu")(image)
    assert torch.equal(off, plain(image))


def test_export_of_a_calibrated_checkpoint_carries_it_in_graph_and_metadata(calibrated, tmp_path):
    from segtrain.config import compose_config
    from segtrain.export import export_checkpoint

    _, target, _ = calibrated
    entry = torch.load(target, weights_only=True)["calibration"]
    out = tmp_path / "model.pt2"
    ecfg = compose_config([f"checkpoint={target}", "format=torch_export", f"output={out}", "size=64",
                           "verify_size=[40,50]"], config_name="export")
    assert export_checkpoint(ecfg, [])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["calibration"] == {key: entry[key] for key in ("temperature", "bias", "objective")}
    program = torch.export.load(str(out)).module()
    from segtrain.predict import Predictor

    predictor = Predictor.from_checkpoint(target, device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(program(x), predictor.model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("report.worst_k=-1", r"report.worst_k=-1: expected a number of images per class >= 0"),
    ("calibration.bins=0", r"calibration.bins=0: expected null or a number of bins >= 1"),
    ("calibration.max_pixels=1.5", r"calibration.max_pixels=1.5: expected a number of pixels >= 1"),
])
def test_analysis_options_are_checked_before_training(override, message, tmp_path):
    from segtrain.config import compose_config
    from segtrain.train import train

    with pytest.raises(ValueError, match=message):
        train(compose_config(["debug=fast", f"dataset.root={tmp_path / 'data'}", override]), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_calibrate_never_writes_over_its_input(calibrated, capsys):
    from segtrain.calibrate import main

    _, target, _ = calibrated
    digest = _sha(target)
    for argv in ([f"checkpoint={target}"], [f"checkpoint={target}", f"output={target}"]):  # default name = itself
        assert main(argv) == 2
        assert re.search(r"^error: output=.*last_calibrated.pt: that is the checkpoint being calibrated, which is "
                         r"never overwritten; give another output=<file>$", capsys.readouterr().err, re.M)
    assert _sha(target) == digest


def test_a_guarded_mean_never_switches_a_class_off():
    """Class 2 is right on 10 of its 210 predicted pixels, the other 200 are class 1's and look the same: mIoU alone is
    highest with class 2 switched off (class 1 gains more than class 2 loses); the guard keeps every class within
    max_drop of its score, so here class 2 stays as it was."""
    from segtrain.analysis.decision import guarded, switched_off
    from segtrain.metrics import class_scores

    logits = torch.zeros(1010, 3)
    labels = torch.cat([torch.zeros(300), torch.ones(500), torch.full((10,), 2), torch.ones(200)]).long()
    logits[:300, 0] = 3.0  # class 0: right
    logits[300:800, 1] = 3.0  # class 1: right
    logits[800:, 2], logits[800:, 1] = 3.0, 2.0  # class 2's 10 pixels and 200 of class 1's, alike: 2 then 1
    reference = confusion(labels, predict(logits, torch.zeros(3)), 3)
    plain = parse_objective("mIoU", ["a", "b", "c"])
    bias, _, _ = tune_bias(logits, labels, plain)
    after = confusion(labels, predict(logits, bias), 3)
    assert after[:, 2].sum() == 0 and switched_off(reference, after, ["a", "b", "c"]) == ["c"]  # off, and said so
    bias, start, best = tune_bias(logits, labels, guarded(plain, reference, 0.02))
    after = confusion(labels, predict(logits, bias), 3)
    scores, before = class_scores(after)["iou"], class_scores(reference)["iou"]
    assert after[2, 2] > 0 and (scores >= before - 0.02).all() and best >= start
    assert switched_off(reference, after, ["a", "b", "c"]) == []
