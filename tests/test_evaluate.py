"""`python -m segtrain.evaluate` scores a checkpoint with the config it was trained with."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from segtrain.build import build_model, dataset_split, eval_transform_of
from segtrain.checkpoint import read_for_inference, read_with_overrides
from segtrain.config import compose_config
from segtrain.evaluate import evaluate_checkpoint, main
from segtrain.metrics import flatten_metrics
from segtrain.train import train

ROOT = Path(__file__).resolve().parents[1]
# Not the defaults (ce_dice, median_freq), so that what an override keeps can be told apart.
TRAINED_WITH = ["loss=focal_dice", "weights=inverse_freq", "model.decoder_channels=[64,32,16,16,8]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    overrides = ["debug=fast", f"dataset.root={tmp / 'data'}", "trainer.max_steps=4", "trainer.epochs=1",
                 *TRAINED_WITH]
    cfg = compose_config(overrides)
    # As if configs/loss/focal_dice.yaml had said gamma 1.5 when this run was trained: a value that
    # only the checkpoint's own config holds, not a fresh composition of its command line.
    cfg.loss.terms.focal.gamma = 1.5
    train(cfg, tmp / "run", overrides=overrides)
    return tmp


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_checkpoint_scores_exactly_what_the_run_reported(trained):
    metrics, names = evaluate_checkpoint(trained / "run/checkpoints/last.pt")
    flat = flatten_metrics(metrics, names, "val")
    final = json.loads((trained / "run/metrics.json").read_text())["final"]
    assert flat.keys() == final.keys()
    assert not math.isnan(final["val/mIoU"]) and not math.isnan(final["val/loss"])
    assert all(_same(flat[k], final[k]) for k in final if k != "val/loss")
    assert flat["val/loss"] == pytest.approx(final["val/loss"], rel=1e-6)


def test_overrides_replace_only_what_they_name(trained):
    ckpt = trained / "run/checkpoints/last.pt"
    saved = read_for_inference(ckpt)
    _, cfg = read_with_overrides(ckpt, ["dataset=folder", f"dataset.root={trained / 'data'}", "dataset.num_classes=3"])
    assert cfg.dataset.name == "folder" and cfg.dataset.class_names is None
    for kept in ("model", "loss", "weights", "optimizer", "trainer"):  # as trained, not the defaults
        assert cfg[kept] == saved.config[kept], kept
    assert list(cfg.loss.terms) == ["focal", "dice"] and cfg.weights.strategy == "inverse_freq"
    assert cfg.loss.terms.focal.gamma == 1.5  # from the checkpoint, not from today's config files
    assert list(cfg.model.decoder_channels) == [64, 32, 16, 16, 8]

    on_val, _ = evaluate_checkpoint(ckpt)
    on_train, _ = evaluate_checkpoint(ckpt, ["dataset.split=train"])
    assert math.isfinite(on_train["loss"]) and math.isfinite(on_val["loss"])
    assert on_train["loss"] != on_val["loss"]  # 8 train images, not the 4 val ones
    # A group override swaps the dataset but keeps the trained model: the same images, the same numbers.
    folder, names = evaluate_checkpoint(ckpt, ["dataset=folder", f"dataset.root={trained / 'data'}",
                                               "dataset.num_classes=3"])
    assert names == ["class_0", "class_1", "class_2"]
    assert folder["loss"] == pytest.approx(on_val["loss"], rel=1e-6)
    flat_val, flat_folder = flatten_metrics(on_val, [0, 1, 2]), flatten_metrics(folder, [0, 1, 2])
    assert all(_same(flat_folder[k], flat_val[k]) for k in flat_val if k != "val/loss")


def test_val_resize_scores_logits_resized_back_to_the_mask(trained):
    """dataset.val_resize=<int>: the image is resized, the logits are interpolated back to the mask."""
    ckpt = trained / "run/checkpoints/last.pt"
    metrics, _ = evaluate_checkpoint(ckpt, ["dataset.val_resize=40"])
    saved, cfg = read_with_overrides(ckpt, ["dataset.val_resize=40"])
    model = build_model(cfg.model)
    model.load_state_dict(saved.weights)
    model.eval()
    split = dataset_split(cfg.dataset, "val", eval_transform_of(cfg.dataset))
    oracle = MulticlassJaccardIndex(3, average="macro", ignore_index=255)
    with torch.no_grad():
        for i in range(len(split)):
            image, mask = split[i]
            assert image.shape[-2:] == (40, 40) and mask.shape == (64, 64)
            logits = torch.nn.functional.interpolate(model(image[None]), size=(64, 64), mode="bilinear")
            oracle.update(logits.argmax(1), mask[None])
    assert metrics["mIoU"] == pytest.approx(oracle.compute().item(), rel=1e-6)
    plain, _ = evaluate_checkpoint(ckpt)
    assert metrics["mIoU"] != plain["mIoU"]  # scored on other logits than the full-size run


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


def test_cli_usage_missing_and_foreign_checkpoint(tmp_path, capsys):
    assert main([]) == 2
    assert "checkpoint=<path" in capsys.readouterr().err
    # Errors name the file and what is wrong, without a traceback, exit status 2.
    assert main([f"checkpoint={tmp_path / 'nope.pt'}"]) == 2
    assert re.search(r"^error: .*nope.pt: checkpoint not found$", capsys.readouterr().err, re.M)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert main([f"checkpoint={tmp_path / 'other.pt'}"]) == 2
    assert re.search(r"^error: .*other.pt: not a segtrain checkpoint \(no model, config, class_names\)",
                     capsys.readouterr().err, re.M)


@pytest.mark.parametrize("cpu", ["this", "native_bf16"])
def test_report_of_evaluate_adds_up_to_the_split_and_its_ece_is_torchmetrics(trained, cpu, request, tmp_path):
    """per_image.csv's pixel counts are the val masks'; its per-image Dice, pooled, give the dataset Dice; the
    ECE equals torchmetrics' on Predictor's probabilities of every labelled pixel. Both paths run each image alone
    (batch_size_val=1: the same kernels) in the precision predict uses, also for a run whose trainer.amp=auto picked
    bf16 on a CPU with native bf16 units: evaluate scores what predict predicts."""
    import csv

    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    from segtrain.data.folder import read_mask
    from segtrain.predict import Predictor

    amp = []
    if cpu == "native_bf16":
        request.getfixturevalue("native_bf16")
        amp = ["trainer.amp=auto"]  # the run's precision there: bf16
    ckpt = trained / "run/checkpoints/last.pt"
    folder = tmp_path / "report"
    metrics, names = evaluate_checkpoint(ckpt, [f"report.dir={folder}", "report.worst_k=2",
                                                "dataset.batch_size_val=1", *amp])
    rows = list(csv.DictReader((folder / "per_image.csv").open()))
    masks = sorted((trained / "data/masks/val").glob("*.png"))
    assert len(rows) == len(masks) * len(names)
    counts = {path.stem: np.bincount(read_mask(path).ravel(), minlength=256)[: len(names)] for path in masks}
    true = np.zeros(len(names), dtype=np.int64)
    pred = np.zeros(len(names), dtype=np.int64)
    tp = np.zeros(len(names))
    for row in rows:  # each image's row holds that image's own mask counts
        c = names.index(row["class"])
        assert int(row["true_pixels"]) == counts[Path(row["image"]).stem][c], row
        true[c] += int(row["true_pixels"])
        pred[c] += int(row["predicted_pixels"])
        tp[c] += float(row["dice"] or 0) * (int(row["true_pixels"]) + int(row["predicted_pixels"])) / 2
    np.testing.assert_allclose(2 * tp / (true + pred), metrics["dice"].numpy(), rtol=1e-5)
    assert {p.name for p in folder.iterdir()} >= {"per_image.csv", "report.md", *(f"gallery_{n}.jpg" for n in names
                                                                                  if (true + pred)[names.index(n)])}
    # ECE from the model's own logits, through torchmetrics.
    predictor = Predictor.from_checkpoint(ckpt, amp, device="cpu")
    probs, labels = [], []
    for path, mask_path in zip(sorted((trained / "data/images/val").glob("*.png")), masks):
        from segtrain.data.folder import read_image

        p = predictor(read_image(path))  # (K, H, W)
        mask = torch.from_numpy(read_mask(mask_path)).long()
        valid = mask != 255
        probs.append(p.permute(1, 2, 0)[valid])
        labels.append(mask[valid])
    probs, labels = torch.cat(probs), torch.cat(labels)
    expected = MulticlassCalibrationError(num_classes=len(names), n_bins=15, norm="l1")(probs, labels)
    assert metrics["ece"] == pytest.approx(float(expected), abs=1e-6)
    for c in range(len(names)):
        one = BinaryCalibrationError(n_bins=15, norm="l1")(probs[:, c], (labels == c).long())
        assert metrics["class_ece"][c].item() == pytest.approx(float(one), abs=1e-6)


def test_the_run_wrote_its_report_and_logged_calibration(trained):
    final = json.loads((trained / "run/metrics.json").read_text())["final"]
    assert {"val/ece", "val/ece/background", "val/ece/region", "val/ece/spot"} <= final.keys()
    report = trained / "run/eval/val"
    assert (report / "per_image.csv").is_file() and (report / "report.md").is_file()
    metrics, _ = evaluate_checkpoint(trained / "run/checkpoints/last.pt", report=False)
    assert metrics["ece"] == pytest.approx(final["val/ece"], abs=1e-12)
