"""The CUDA paths: mixed precision, channels_last and compile, the fused loss, the metrics, sliding windows,
NCCL. Marked ``gpu`` and skipped, with the reason, where no CUDA device is present (``pytest -m gpu``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Deterministic cuBLAS for the exact-resume tests: read when the first cuBLAS handle is made, so set early.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from test_losses import FUSED_PAIRS, ignored_logit_mask, multiclass_batch  # noqa: E402

from segtrain.analysis.calibration import ReliabilityHistogram  # noqa: E402
from segtrain.analysis.per_image import PerImageConfusion  # noqa: E402
from segtrain.build import build_model  # noqa: E402
from segtrain.checkpoint import load_checkpoint  # noqa: E402
from segtrain.config import compose_config  # noqa: E402
from segtrain.distributed import parameters_digest  # noqa: E402
from segtrain.inference import InferenceOptions, predict_probs  # noqa: E402
from segtrain.losses import CompositeLoss  # noqa: E402
from segtrain.metrics import ConfusionMatrix, SoftDiceTracker  # noqa: E402
from segtrain.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")]


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return ["debug=fast", f"dataset.root={tmp_path / 'data'}", "trainer.device=cuda", "trainer.log_every=1",
            "trainer.deterministic=true", *extra]


def _digest(run: Path, cfg) -> str:
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "last.pt")["model"])
    return parameters_digest(model)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_trains_and_resumes_exactly(amp, tmp_path):
    common = _overrides(tmp_path, f"trainer.amp={amp}", "trainer.grad_clip=1.0", "trainer.epochs=3")
    full_cfg = compose_config(common + ["trainer.max_steps=null"])
    train(full_cfg, tmp_path / "full")
    train(compose_config(common + ["trainer.max_steps=6"]), tmp_path / "stopped")  # mid-epoch 2 of 3
    train(compose_config(common + ["trainer.max_steps=null",
                                   f"trainer.resume={tmp_path / 'stopped/checkpoints/last.pt'}"]), tmp_path / "resumed")
    full = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    assert full["train_state"]["step"] == 12
    if amp == "fp16":
        assert full["scaler"]["scale"] > 0  # the GradScaler ran
        assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["scaler"] == full["scaler"]
    assert _digest(tmp_path / "full", full_cfg) == _digest(tmp_path / "resumed", full_cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "full/tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns


def test_channels_last_and_compile_match_eager(tmp_path):
    common = _overrides(tmp_path, "trainer.amp=none")
    train(compose_config(common), tmp_path / "eager")
    train(compose_config(common + ["trainer.channels_last=true", "trainer.compile=true"]), tmp_path / "fast")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = []
    for run in ("eager", "fast"):
        acc = EventAccumulator(str(tmp_path / run / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        losses.append([e.value for e in acc.Scalars("train/loss")])
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-3)  # the same weights and batch, other kernels


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", ["focal_dice_weighted", "ce_dice_weighted"])
def test_fused_loss_on_cuda_equals_the_terms_apart(name, amp):
    logits, target = multiclass_batch(0, n=3, h=33, w=29, scale=3.0)
    logits, target = logits.cuda(), target.cuda()
    results = []
    for fuse in (True, False):
        leaf = logits.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = CompositeLoss(FUSED_PAIRS[name](), fuse=fuse).cuda()(leaf, target)
        out["loss"].backward()
        results.append((out, leaf.grad))
    (fused, fused_grad), (apart, apart_grad) = results
    for key in apart:
        torch.testing.assert_close(fused[key], apart[key], rtol=1e-5 if not amp else 1e-3, atol=1e-6)
    torch.testing.assert_close(fused_grad, apart_grad, rtol=1e-4 if not amp else 2**-7, atol=1e-7)
    assert torch.all(fused_grad[ignored_logit_mask(logits, target)] == 0)


def test_metrics_on_cuda_equal_cpu():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 37, 41, generator=g) * 3
    target = torch.randint(0, 3, (4, 37, 41), generator=g)
    target[:, :4] = 255
    results = []
    for device in ("cpu", "cuda"):
        cm, dice = ConfusionMatrix(3, device=device), SoftDiceTracker(3)
        per_image, hist = PerImageConfusion(3, device=device), ReliabilityHistogram(3, device=device)
        x, y = logits.to(device), target.to(device)
        for i in range(0, 4, 2):
            cm.update(x[i:i + 2], y[i:i + 2])
            dice.update(x[i:i + 2], y[i:i + 2])
            per_image.update(x[i:i + 2], y[i:i + 2], [i, i + 1])
            hist.update(x[i:i + 2], y[i:i + 2])
        results.append((cm.matrix.cpu(), dice.compute_and_reset(), per_image.result()[1], hist.ece(), hist.class_ece()))
    (cm_c, dice_c, pi_c, ece_c, cls_c), (cm_g, dice_g, pi_g, ece_g, cls_g) = results
    assert torch.equal(cm_c, cm_g) and torch.equal(pi_c, pi_g)
    torch.testing.assert_close(dice_g, dice_c, rtol=1e-5, atol=1e-7)
    assert ece_g == pytest.approx(ece_c, abs=1e-6)
    torch.testing.assert_close(cls_g, cls_c, rtol=0, atol=1e-6)


def test_sliding_window_on_cuda_equals_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    image = torch.randn(3, 300, 410)
    options = InferenceOptions(mode="slide", tile=(128, 128), overlap=0.5, flips=("h",))
    cpu = predict_probs(model, image, options)
    gpu = predict_probs(model.cuda(), image.cuda(), options)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


def test_torchrun_one_rank_with_nccl_and_sync_batchnorm(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=1", "-m", "segtrain",
           *_overrides(tmp_path, "trainer.deterministic=false", "model.sync_bn=true", f"hydra.run.dir={tmp_path / 'run'}")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 1
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["train_state"]["step"] == 2
