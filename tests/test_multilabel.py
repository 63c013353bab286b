"""Multi-label data end to end: codes, both target forms, per-channel statistics, weights and metrics against
hand computations and torchmetrics, and the commands (train, evaluate, calibrate, predict, export) on a small
set of overlapping channels with a rare one."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import (BinaryCalibrationError, MultilabelF1Score, MultilabelJaccardIndex,
                                         MultilabelPrecision, MultilabelRecall)

import segtrain  # noqa: F401  (makes torchvision importable beside the CPU torch build)
from segtrain.analysis.calibration import ReliabilityHistogram
from segtrain.analysis.thresholds import parse_channel_objective, thresholds_of, tune_thresholds
from segtrain.build import PadCollate
from segtrain.config import compose_config
from segtrain.data.binary_masks import BinaryMaskDataset
from segtrain.data.class_stats import ChannelStats
from segtrain.data.class_weights import compute_channel_weights
from segtrain.data.crop import ClassAwareCrop
from segtrain.data.folder import FolderDataset
from segtrain.data.multilabel import channel_counts, fill_code, pack, unpack
from segtrain.data.synthetic import make_layers
from segtrain.metrics import ChannelConfusion

IGNORE = 255
NAMES = ["outer", "inner", "scratch"]
REGIONS = "{outer:[1,2,3],inner:[2,3],scratch:[3]}"


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------- codes, decoders, statistics


def test_codes_round_trip_and_count_every_channel():
    rng = np.random.default_rng(0)
    positive, ignored = rng.random((9, 7, 4)) < 0.3, rng.random((9, 7, 4)) < 0.2
    codes = pack(positive & ~ignored, ignored)
    target = unpack(torch.from_numpy(codes), 4, IGNORE).numpy()  # (4, 9, 7)
    expected = np.where(ignored, IGNORE, positive & ~ignored).transpose(2, 0, 1)
    np.testing.assert_array_equal(target, expected)
    counts = channel_counts(codes, 4)
    np.testing.assert_array_equal(counts[:4], (positive & ~ignored).sum((0, 1)))
    np.testing.assert_array_equal(counts[4:], (~ignored).sum((0, 1)))
    assert (unpack(torch.tensor([[fill_code(4)]]), 4) == IGNORE).all()  # padding: ignored in every channel


def test_regions_of_a_label_map(tmp_path):
    labels = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    _png(tmp_path / "images/val/a.png", np.zeros((2, 3, 3), np.uint8))
    _png(tmp_path / "masks/val/a.png", labels)
    dataset = FolderDataset(tmp_path, "val", 3, regions={"whole": [1, 2, 3], "core": [2, 3], "enh": [3]})
    target = unpack(torch.from_numpy(dataset.load_mask(0)), 3).numpy()
    np.testing.assert_array_equal(target[0], [[0, 1, 1], [1, 255, 1]])  # whole
    np.testing.assert_array_equal(target[1], [[0, 0, 1], [1, 255, 0]])  # core
    np.testing.assert_array_equal(target[2], [[0, 0, 0], [1, 255, 0]])  # enhancing
    _png(tmp_path / "masks/val/a.png", np.array([[0, 4, 2], [3, 255, 1]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"a\.png: labels outside \[0, 4\).*value 4 \(1 px\)"):
        dataset.load_mask(0)
    with pytest.raises(ValueError, match="dataset.regions has 3 regions .* dataset.num_classes=2"):
        FolderDataset(tmp_path, "val", 2, regions={"whole": [1, 2, 3], "core": [2, 3], "enh": [3]})


@pytest.mark.parametrize("missing, spot", [("negative", 0), ("ignore", IGNORE)])
def test_binary_mask_folders(tmp_path, missing, spot):
    _png(tmp_path / "images/val/a.png", np.zeros((2, 3, 3), np.uint8))
    _png(tmp_path / "masks/val/a/region.png", np.array([[0, 255, 255], [0, 1, 0]], np.uint8))
    _png(tmp_path / "masks/val/a/ignore.png", np.array([[0, 0, 255], [0, 0, 0]], np.uint8))
    dataset = BinaryMaskDataset(tmp_path, "val", 2, class_names=["region", "spot"], missing_mask=missing)
    target = unpack(torch.from_numpy(dataset.load_mask(0)), 2).numpy()
    np.testing.assert_array_equal(target[0], [[0, 1, 255], [0, 1, 0]])
    np.testing.assert_array_equal(target[1], [[spot, spot, 255], [spot, spot, spot]])
    _png(tmp_path / "masks/val/a/spot.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"a: the masks differ in size: region\.png 3x2, spot\.png 3x3"):
        dataset.load_mask(0)
    shutil.rmtree(tmp_path / "masks/val/a")
    (tmp_path / "masks/val/a").mkdir()
    with pytest.raises(FileNotFoundError, match="none of the class masks region.png, spot.png"):
        dataset.load_mask(0)


def test_positive_class_weights_by_hand():
    # two images, two channels: (positive, valid) pixels per image and channel
    counts = np.array([[10, 0, 100, 100],
                       [30, 5, 100, 50]])
    stats = ChannelStats.from_counts(counts)
    np.testing.assert_array_equal(stats.positive, [40, 5])
    np.testing.assert_array_equal(stats.valid, [200, 150])
    np.testing.assert_array_equal(stats.images, [2, 1])
    inverse = compute_channel_weights(stats, "inverse_freq")
    torch.testing.assert_close(inverse, torch.tensor([160 / 40, 145 / 5]))  # absent / present pixels
    # median frequency: freq = pixels / pixels of the images containing the class, weight ratio f_absent / f_present
    median = compute_channel_weights(stats, "median_freq")
    torch.testing.assert_close(median, torch.tensor([(160 / 200) / (40 / 200), (145 / 150) / (5 / 50)]))
    torch.testing.assert_close(compute_channel_weights(stats, "inverse_freq", max_weight=10.0), torch.tensor([4.0, 10.0]))
    with pytest.raises(ValueError, match="normalize=mean: in multi-label mode"):
        compute_channel_weights(stats, "inverse_freq", normalize="mean")
    torch.testing.assert_close(compute_channel_weights(stats, "manual", values=[1.0, 7.0]), torch.tensor([1.0, 7.0]))


def test_collate_pads_every_channel_as_ignored():
    a = (torch.zeros(3, 2, 2), torch.from_numpy(pack(np.ones((2, 2, 2), bool), np.zeros((2, 2, 2), bool))).long())
    b = (torch.zeros(3, 3, 1), torch.zeros(3, 1, dtype=torch.long))
    images, target = PadCollate(IGNORE, channels=2)([a, b])
    assert images.shape == (2, 3, 3, 2) and target.shape == (2, 2, 3, 2) and target.dtype == torch.uint8
    assert (target[0, :, :2, :2] == 1).all() and (target[0, :, 2] == IGNORE).all()
    assert (target[1, :, :, 0] == 0).all() and (target[1, :, :, 1] == IGNORE).all()


def test_rare_crops_centre_on_the_rare_channel():
    positive = np.zeros((64, 64, 2), bool)
    positive[:, :40, 0] = True  # common channel
    positive[60, 60, 1] = True  # one pixel of the rare channel, outside every crop of the common one
    codes = pack(positive, np.zeros_like(positive))
    crop = ClassAwareCrop(8, 8, fill_code(2), rare_crop_p=1.0, class_frequency=[0.5, 0.001], channels=2)
    hits = 0
    for seed in range(40):
        crop.set_random_seed(seed)
        x0, y0, x1, y1 = crop.get_params_dependent_on_data({}, {"mask": codes})["crop_coords"]
        hits += y0 <= 60 < y1 and x0 <= 60 < x1
    # drawn ~ 1 / frequency: the rare channel 500 times as often as the common one
    assert hits >= 36
    with pytest.raises(ValueError, match="cat_max_ratio .* multi-label channels overlap"):
        ClassAwareCrop(8, 8, fill_code(2), cat_max_ratio=0.75, channels=2)


def _random_multilabel(seed=0, shape=(3, 4, 9, 11)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    target = (torch.rand(shape, generator=g) < 0.3).to(torch.uint8)
    target[torch.rand(shape, generator=g) < 0.15] = IGNORE
    return logits, target


def test_channel_metrics_equal_torchmetrics():
    logits, target = _random_multilabel()
    matrix = ChannelConfusion(4, IGNORE)
    matrix.update(logits[:2], target[:2])
    matrix.update(logits[2:], target[2:])  # summed over batches, not averaged
    ours = matrix.compute()
    probs = logits.sigmoid()
    for key, metric in (("dice", MultilabelF1Score), ("iou", MultilabelJaccardIndex),
                        ("precision", MultilabelPrecision), ("recall", MultilabelRecall)):
        reference = metric(num_labels=4, threshold=0.5, average=None, ignore_index=IGNORE)(probs, target.long())
        torch.testing.assert_close(ours[key].float(), reference, msg=key)
    valid = target != IGNORE
    assert ours["pixel_acc"] == pytest.approx(float(((logits > 0) == (target == 1))[valid].float().mean()))


def test_channel_calibration_equals_torchmetrics():
    logits, target = _random_multilabel(1)
    histogram = ReliabilityHistogram(4, 15, IGNORE, multilabel=True)
    histogram.update(logits, target)
    for c, ece in enumerate(histogram.class_ece().tolist()):
        valid = target[:, c] != IGNORE
        reference = BinaryCalibrationError(n_bins=15)(logits[:, c].sigmoid()[valid], target[:, c][valid].long())
        assert ece == pytest.approx(float(reference), abs=1e-6)


def test_thresholds_tuned_per_channel_exactly():
    """Channel 0 is best cut at 0.8 (its positives score high), channel 1 at 0.2; the grid search finds each."""
    rng = np.random.default_rng(0)
    p0 = np.concatenate([rng.uniform(0.82, 0.99, 200), rng.uniform(0.01, 0.78, 400)])
    p1 = np.concatenate([rng.uniform(0.22, 0.99, 100), rng.uniform(0.01, 0.18, 500)])
    logits = torch.logit(torch.tensor(np.stack([p0, p1], 1), dtype=torch.float32))
    labels = torch.tensor(np.stack([np.r_[np.ones(200), np.zeros(400)], np.r_[np.ones(100), np.zeros(500)]], 1)).long()
    labels[0, 0] = -1  # ignored entries count for nothing
    bias, start, best = tune_thresholds(logits, labels, parse_channel_objective("mDice", ["a", "b"]))
    t = thresholds_of(bias)
    assert 0.78 <= t[0] <= 0.82 and 0.18 <= t[1] <= 0.22 and best == pytest.approx(1.0) and start < best
    only_b = tune_thresholds(logits, labels, parse_channel_objective("dice/b", ["a", "b"]))[0]
    assert only_b[0] == 0 and 0.18 <= thresholds_of(only_b)[1] <= 0.22
    with pytest.raises(ValueError, match="decision.objective='dice/c'"):
        parse_channel_objective("dice/c", ["a", "b"])


# ---------------------------------------------------------------- the commands, both target forms


def _write_forms(root):
    """The same images as a label map with nested regions (0 none, 1 outer, 2 inner, 3 scratch) and as the
    per-class masks of those regions: ``root/regions`` and ``root/binary``."""
    for split, count, seed in (("train", 6, 0), ("val", 4, 1)):
        for i in range(count):
            rng = np.random.default_rng([seed, i])
            image, layers, ignored = make_layers(rng, np.random.default_rng([seed, i, 1]), 64)
            labels = np.zeros((64, 64), np.uint8)
            labels[layers[..., 0]] = 1
            labels[layers[..., 1]] = 2  # a spot is inside the outer region or on its own
            labels[layers[..., 2]] = 3
            labels[ignored] = IGNORE
            for form in ("regions", "binary"):
                _png(root / form / f"images/{split}/{i}.png", image)
            _png(root / f"regions/masks/{split}/{i}.png", labels)
            layers = {"outer": np.isin(labels, [1, 2, 3]), "inner": np.isin(labels, [2, 3]), "scratch": labels == 3,
                      "ignore": labels == IGNORE}
            for name, layer in layers.items():
                _png(root / f"binary/masks/{split}/{i}/{name}.png", layer.astype(np.uint8) * 255)


def _overrides(root, form):
    common = ["debug=fast", "dataset=folder", f"dataset.root={root / form}", "dataset.num_classes=3",
              "loss=bce_dice", "trainer.epochs=8", "trainer.max_steps=24", "dataset.batch_size_val=2", "dataset.augment.hflip=false"]
    if form == "regions":
        return [*common, f"dataset.regions={REGIONS}"]
    return [*common, "dataset.layout=binary_masks", f"dataset.class_names=[{','.join(NAMES)}]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from segtrain.train import train

    root = tmp_path_factory.mktemp("multilabel")
    _write_forms(root)
    for form in ("regions", "binary"):
        overrides = _overrides(root, form)
        train(compose_config(overrides), root / f"run_{form}", overrides=overrides)
    return root


def test_regions_train_as_their_written_masks(runs):
    regions, binary = (json.loads((runs / f"run_{form}/metrics.json").read_text()) for form in ("regions", "binary"))
    assert regions["parameters_sha256"] == binary["parameters_sha256"]
    assert regions["final"] == binary["final"]
    assert regions["class_names"] == binary["class_names"] == NAMES
    report = (runs / "run_regions/eval/val/report.md").read_text()  # the hard cases, per channel
    assert all(f"## {name}" in report for name in NAMES) and (runs / "run_regions/eval/val/gallery_outer.jpg").is_file()


def test_dataset_check_and_repeat_factors_per_channel(runs):
    from segtrain.build.data import _repeat_factors
    from segtrain.data.check import check_split, format_report

    dataset = BinaryMaskDataset(runs / "binary", "train", 3, class_names=NAMES)
    report = check_split(dataset)
    counts = np.stack([channel_counts(dataset.load_mask(i), 3) for i in range(len(dataset))])
    np.testing.assert_array_equal(report.pixel_count, counts[:, :3].sum(0))
    np.testing.assert_array_equal(report.valid_count, counts[:, 3:].sum(0))
    share = counts[:, 2].sum() / counts[:, 5].sum()  # scratch against its own valid pixels
    assert f"{share:.2%}" in format_report(report, NAMES).splitlines()[-2]  # the last class's row; then the ignored
    # repeat factors from the channels' presence: r = max(1, sqrt(t / f)), f = share of images with the channel
    ds = compose_config(_overrides(runs, "binary") + ["dataset.sampling.repeat_thresh=0.9"]).dataset
    presence = counts[:, :3] > 0
    per_channel = np.maximum(1.0, np.sqrt(0.9 / presence.mean(0)))
    np.testing.assert_allclose(_repeat_factors(counts, ds), np.where(presence, per_channel, 1.0).max(1))


@torch.no_grad()
def _model_logits(checkpoint, root, split="val"):
    """(the model's float32 logits, the targets) of every image of the split, computed here by hand."""
    from segtrain.predict import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, [], device="cpu")
    logits, targets = [], []
    dataset = BinaryMaskDataset(root / "binary", split, 3, class_names=NAMES)
    for i in range(len(dataset)):
        image = np.asarray(Image.open(dataset.image_paths[i]).convert("RGB"))
        x = torch.from_numpy(predictor.transform(image=image)["image"]).permute(2, 0, 1)[None]
        logits.append(predictor.model(x)[0].float())
        targets.append(unpack(torch.from_numpy(dataset.load_mask(i)), 3))
    return torch.stack(logits), torch.stack(targets)


@pytest.mark.parametrize("form", ["regions", "binary"])
def test_evaluate_scores_each_channel_as_torchmetrics(runs, form):
    from segtrain.evaluate import evaluate_checkpoint

    checkpoint = runs / f"run_{form}/checkpoints/last.pt"
    metrics, names = evaluate_checkpoint(checkpoint, report=False)
    logits, target = _model_logits(checkpoint, runs)
    assert (target == IGNORE).any() and names == NAMES
    reference = MultilabelF1Score(num_labels=3, threshold=0.5, average=None, ignore_index=IGNORE)(
        logits.sigmoid(), target.long())
    torch.testing.assert_close(metrics["dice"].float(), reference)
    assert metrics["class_ece"].shape == (3,) and math.isfinite(metrics["ece"])


@pytest.mark.parametrize("form", ["regions", "binary"])
def test_calibrate_predict_and_export_agree(runs, tmp_path, form):
    """Tuned thresholds stored and applied; predict's per-class PNGs give evaluate's numbers; the exported mask head
    gives predict's masks in ONNX Runtime."""
    import onnxruntime as ort

    from segtrain.calibrate import calibrate
    from segtrain.evaluate import evaluate_checkpoint
    from segtrain.predict import main as predict_main

    checkpoint = runs / f"run_{form}/checkpoints/last.pt"
    target_ckpt, entry = calibrate(checkpoint, ["decision.tune=true", "decision.objective=mDice",
                                                "dataset.split=train"], str(tmp_path / "cal.pt"))
    assert entry["multilabel"] and len(entry["thresholds"]) == 3
    assert entry["thresholds"] == pytest.approx(thresholds_of(entry["bias"]))
    assert any(t != 0.5 for t in entry["thresholds"])  # something was tuned
    # The thresholds act on the temperature-scaled probability: sigmoid(z / T) > t, i.e. sigmoid(z / T + b) > 0.5.
    metrics, _ = evaluate_checkpoint(target_ckpt, report=False)
    logits, target = _model_logits(checkpoint, runs)
    probs = torch.sigmoid(logits / entry["temperature"] + torch.tensor(entry["bias"]).view(1, 3, 1, 1))
    reference = MultilabelF1Score(num_labels=3, threshold=0.5, average=None, ignore_index=IGNORE)(probs, target.long())
    torch.testing.assert_close(metrics["dice"].float(), reference)

    out = tmp_path / "pred"
    assert predict_main([f"checkpoint={target_ckpt}", f"input={runs / 'binary/images/val'}", f"output={out}",
                         "save.overlay=true", "progress=false"]) == 0
    predicted = torch.stack([torch.stack([torch.from_numpy(np.asarray(Image.open(out / f"{i}/{n}.png")) > 0)
                                          for n in NAMES]) for i in range(4)])
    matrix = ChannelConfusion(3, IGNORE)
    matrix.update(predicted, target)
    torch.testing.assert_close(matrix.compute()["dice"], metrics["dice"])
    assert (out / "0_overlay.jpg").is_file() and (out / "0_color.png").is_file()

    from segtrain.export import main as export_main
    onnx_path = tmp_path / "model.onnx"
    assert export_main([f"checkpoint={target_ckpt}", "format=onnx", "head=mask", "input=uint8",
                        f"output={onnx_path}", "size=64", "verify_size=96"]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == NAMES and json.loads(meta["multilabel"]) is True
    assert json.loads(meta["calibration"])["thresholds"] == pytest.approx(entry["thresholds"])
    for i in range(4):
        image = np.asarray(Image.open(runs / f"binary/images/val/{i}.png").convert("RGB"))
        masks = session.run(None, {"image": image.transpose(2, 0, 1)[None].copy()})[0][0]
        assert masks.shape == (3, 64, 64)
        np.testing.assert_array_equal(masks.astype(bool), predicted[i].numpy())


def test_stats_command_shows_each_channel(runs, capsys, compose_cfg):
    from segtrain.stats import class_stats_report

    report = class_stats_report(compose_cfg(_overrides(runs, "regions")))
    assert "3 multi-label channels" in report and "pos weight (median_freq)" in report
    for name in NAMES:
        assert name in report


def test_component_rules_per_channel_in_evaluate(runs, tmp_path):
    """A calibrated multi-label checkpoint's rules act on each channel's decisions (segtrain.analysis.postprocess)."""
    from segtrain.analysis.calibration import fitted_on
    from segtrain.analysis.postprocess import PostProcess, apply_channels
    from segtrain.checkpoint import load_checkpoint, save_checkpoint
    from segtrain.evaluate import evaluate_checkpoint

    source = runs / "run_binary/checkpoints/last.pt"
    ckpt = load_checkpoint(source)
    rules = {"connectivity": 8, "rules": {"outer": {"max_hole": 40}, "scratch": {"min_size": 30}}}

    class Train:
        root, split = runs / "binary", "train"

    ckpt["calibration"] = {"temperature": 1.0, "bias": [0.0] * 3, "fitted_on": fitted_on(Train), "objective": None,
                           "multilabel": True, "thresholds": [0.5] * 3, "postprocess": rules}
    save_checkpoint(ckpt, tmp_path / "rules.pt")
    metrics, _ = evaluate_checkpoint(tmp_path / "rules.pt", ["dataset.batch_size_val=1"], report=False)
    logits, target = _model_logits(source, runs)
    decided = np.stack([apply_channels(l.sigmoid().numpy() > 0.5, PostProcess.from_dict(rules, NAMES))
                        for l in logits])
    matrix = ChannelConfusion(3, IGNORE)
    matrix.update(torch.from_numpy(decided), target)
    torch.testing.assert_close(metrics["dice"], matrix.compute()["dice"])
    plain = ChannelConfusion(3, IGNORE)
    plain.update(logits, target)
    assert not torch.equal(plain.compute()["dice"], metrics["dice"])  # the rules changed something
