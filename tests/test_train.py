"""End-to-end runs through the real entry point, on the `debug=fast` settings."""

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segtrain.build import build_data, build_model
from segtrain.checkpoint import TrainState, load_checkpoint, load_resumable
from segtrain.distributed import device_for, parameters_digest
from segtrain.losses import build_loss
from segtrain.runtime import NATIVE_BF16_ENV, resolve_amp
from segtrain.train import train
from segtrain.training.engine import FitOptions, Runtime, TrainParts, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segtrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    values = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_two_step_run_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run_cli(["debug=fast", f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(run_dir) in proc.stdout + proc.stderr
    assert f"tensorboard --logdir {run_dir}" in proc.stdout + proc.stderr
    for rel in ("config.yaml", "train.log", ".hydra/config.yaml", "checkpoints/last.pt", "checkpoints/best.pt",
                "metrics.json"):
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["class_names"] == ["background", "region", "spot"]
    assert metrics["steps"] == 2 and len(metrics["class_weights"]) == 3
    assert metrics["weights_strategy"] == "median_freq"
    assert set(metrics["final"]) >= {"val/mIoU", "val/mDice", "val/iou/spot", "val/dice/region", "val/loss"}
    assert not any("/acc/" in key or "/f1/" in key for key in metrics["final"])  # one name per ratio
    assert metrics["best"]["step"] == 2 and metrics["images_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert "spot" in (run_dir / "train.log").read_text()  # the per-class table went to the log
    ckpt = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert ckpt["train_state"]["step"] == 2 and ckpt["class_names"] == metrics["class_names"]
    assert _scalars(run_dir, "train/loss").keys() == {1, 2}
    assert 2 in _scalars(run_dir, "val/dice/spot")


def test_console_script_finds_the_configs_from_any_directory(tmp_path):
    """The `segtrain` entry point imports segtrain.__main__ (so does a wrapper script under torchrun):
    the config directory must not depend on how the module was reached or on the working directory."""
    script = Path(sys.executable).with_name("segtrain")
    proc = subprocess.run([str(script), "--cfg", "job", "debug=fast"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: segtrain.models.UNet" in proc.stdout and "max_steps: 2" in proc.stdout


def test_cli_typo_lists_the_valid_options(tmp_path):
    proc = _run_cli(["loss=focal_dcie"], cwd=ROOT)
    assert proc.returncode != 0
    assert "focal_dcie" in proc.stderr and "Available options" in proc.stderr and "focal_dice" in proc.stderr
    assert not (ROOT / "outputs" / "focal_dcie").exists()


def _parts(model: torch.nn.Module, lr: float, sgd: bool = False) -> TrainParts:
    optimizer = (torch.optim.SGD if sgd else torch.optim.AdamW)(model.parameters(), lr=lr)
    return TrainParts(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      torch.amp.GradScaler("cpu", enabled=False))


def test_loss_decreases_on_a_fixed_batch(compose_cfg, fast_overrides):
    cfg = compose_cfg(fast_overrides)
    train_set = build_data(cfg.dataset).train_set
    images, masks = map(torch.stack, zip(*(train_set[(i, i)] for i in range(4))))
    model = build_model(cfg.model)
    loss_fn = build_loss(cfg.loss, None, num_classes=3, ignore_index=255)
    opts = FitOptions(epochs=1, steps_per_epoch=30, batch_size=4, class_names=["a", "b", "c"], log_every=30,
                      progress=False)
    with torch.no_grad():  # train-mode forward: batch statistics, as the optimised loss sees them
        before = loss_fn(model(images), masks)["loss"].item()
    train_one_epoch(_parts(model, 3e-3), itertools.repeat((images, masks)), loss_fn, Runtime(torch.device("cpu")),
                    TrainState(), opts)
    with torch.no_grad():
        after = loss_fn(model(images), masks)["loss"].item()
    assert after < 0.5 * before, (before, after)


def test_resume_continues_step_count_and_schedule_exactly(compose_cfg, fast_overrides, tmp_path):
    common = fast_overrides + ["trainer.epochs=2", "trainer.batch_size=2", "trainer.log_every=1"]
    full = tmp_path / "full"
    train(compose_cfg(common + ["trainer.max_steps=null"]), full)
    stopped = tmp_path / "stopped"
    train(compose_cfg(common + ["trainer.max_steps=3"]), stopped)
    assert load_checkpoint(stopped / "checkpoints/last.pt")["train_state"]["step"] == 3
    resumed = tmp_path / "resumed"
    train(compose_cfg(common + ["trainer.max_steps=null", f"trainer.resume={stopped / 'checkpoints/last.pt'}"]),
          resumed)

    lr_full, lr_resumed = _scalars(full, "train/lr"), _scalars(resumed, "train/lr")
    assert sorted(lr_full) == list(range(1, 9))  # 8 images / batch 2 = 4 steps per epoch, 2 epochs
    assert sorted(lr_resumed) == list(range(4, 9))
    assert all(lr_resumed[s] == lr_full[s] for s in lr_resumed)
    loss_full, loss_resumed = _scalars(full, "train/loss"), _scalars(resumed, "train/loss")
    assert all(loss_resumed[s] == pytest.approx(loss_full[s], rel=1e-5) for s in loss_resumed)
    end_full = load_checkpoint(full / "checkpoints/last.pt")
    end_resumed = load_checkpoint(resumed / "checkpoints/last.pt")
    assert end_resumed["train_state"]["step"] == end_full["train_state"]["step"] == 8
    assert end_resumed["train_state"]["epoch"] == 2
    for key, value in end_full["model"].items():
        torch.testing.assert_close(end_resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_step_checkpoints_rotate_and_a_corrupt_last_falls_back_to_the_newest_step_file(compose_cfg, fast_overrides,
                                                                                        tmp_path, caplog):
    common = fast_overrides + ["trainer.epochs=2", "trainer.max_steps=null", "trainer.checkpoint_every=3",
                               "trainer.keep_last=3", "trainer.log_every=1"]
    full = tmp_path / "full"
    train(compose_cfg(common), full)
    ckpts = full / "checkpoints"
    # 4 steps per epoch: last.pt at steps 3 (mid-epoch), 4 (epoch end), 6 (mid-epoch) and 8; two kept before it.
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "last.pt", "model_card.md", "step_4.pt",
                                                       "step_6.pt"]
    states = {name: load_checkpoint(ckpts / name)["train_state"] for name in ("last.pt", "step_6.pt", "step_4.pt")}
    assert [s["step"] for s in states.values()] == [8, 6, 4] and states["step_6.pt"]["step_in_epoch"] == 2

    # A run stopped after step 6 whose last.pt is damaged: resume=auto names it and takes step_6.pt.
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpts / "step_6.pt", killed / "checkpoints/step_6.pt")
    (killed / "checkpoints/last.pt").write_bytes((ckpts / "last.pt").read_bytes()[:5000])
    with caplog.at_level("WARNING", logger="segtrain.checkpoint"):
        train(compose_cfg(common + ["trainer.resume=auto"]), killed)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(killed / "checkpoints/last.pt") in warning and str(killed / "checkpoints/step_6.pt") in warning
    end_full, end_resumed = load_checkpoint(ckpts / "last.pt"), load_checkpoint(killed / "checkpoints/last.pt")
    assert end_resumed["train_state"]["step"] == 8
    model = build_model(compose_cfg(fast_overrides).model)
    digests = []
    for ckpt in (end_full, end_resumed):
        model.load_state_dict(ckpt["model"])
        digests.append(parameters_digest(model))
    assert digests[0] == digests[1]
    assert sorted(_scalars(killed, "train/loss")) == [7, 8]
    assert all(_scalars(killed, "train/loss")[s] == _scalars(full, "train/loss")[s] for s in (7, 8))
    # The damaged file was replaced, not kept as a step file; the valid step_6.pt is untouched.
    assert load_checkpoint(killed / "checkpoints/step_6.pt")["train_state"]["step"] == 6


def test_checkpoint_policy_and_checkpoint_fit_are_checked_first(compose_cfg, fast_overrides, tmp_path):
    for override, key in (("trainer.checkpoint_every=0", "trainer.checkpoint_every=0"),
                          ("trainer.keep_last=0", "trainer.keep_last=0")):
        with pytest.raises(ValueError, match=key):
            train(compose_cfg(fast_overrides + [override]), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    train(compose_cfg(fast_overrides), tmp_path / "run")
    other = compose_cfg(fast_overrides + ["model.decoder_channels=[64,32,16,16,8]"])
    parts = _parts(build_model(other.model), lr=0.1)
    with pytest.raises(RuntimeError, match=r"last.pt: its weights do not fit this model: decoder.0"):
        load_resumable(tmp_path / "run/checkpoints/last.pt", parts)
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match=r"partial.pt: not a complete training checkpoint \(no optimizer"):
        load_resumable(tmp_path / "partial.pt", parts)


def test_resume_auto_picks_up_the_run_directory(compose_cfg, fast_overrides, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg(fast_overrides + ["trainer.epochs=2", "trainer.max_steps=2"]), run_dir)
    train(compose_cfg(fast_overrides + ["trainer.epochs=2", "trainer.max_steps=4", "trainer.resume=auto"]), run_dir)
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["train_state"]["step"] == 4
    assert sorted(_scalars(run_dir, "train/loss")) == [1, 2, 3, 4]


def test_gradient_accumulation_matches_one_large_batch():
    # A model without batch statistics: two accumulated micro-batches of 2 must give the same
    # update as one batch of 4 (every pixel valid, so each micro-batch's mean has equal weight).
    g = torch.Generator().manual_seed(0)
    images, masks = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4, 6, 6), generator=g)
    loss_fn = build_loss({"terms": {"ce": {}}}, None, num_classes=3)
    torch.manual_seed(0)
    initial = torch.nn.Conv2d(3, 3, 3, padding=1).weight.detach().clone()
    results = []
    for batch, accum in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 3, 3, padding=1)
        assert torch.equal(model.weight, initial)
        batches = [(images[i : i + batch], masks[i : i + batch]) for i in range(0, 4, batch)]
        opts = FitOptions(epochs=1, steps_per_epoch=1, batch_size=batch, class_names=["a", "b", "c"],
                          grad_accum=accum, progress=False)
        state = TrainState()
        train_one_epoch(_parts(model, 0.5, sgd=True), iter(batches), loss_fn, Runtime(torch.device("cpu")), state,
                        opts)
        assert state.step == 1 and state.images_seen == 4
        results.append(model.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    # The step did move the weights: by far more than the tolerance above.
    assert (results[0] - initial).abs().max() > 1e-2


@pytest.mark.parametrize("cuda_bf16", [True, False])
def test_amp_auto_follows_the_hardware(monkeypatch, cuda_bf16):
    monkeypatch.delenv(NATIVE_BF16_ENV, raising=False)  # the detection itself, whatever --native-bf16 says
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert resolve_amp("auto", torch.device("cuda")) is (torch.bfloat16 if cuda_bf16 else torch.float16)
    # CPUs: bf16 only with AVX512-BF16 or AMX; plain AVX-512 (mkldnn's own check says yes) emulates it.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for avx512_bf16, amx, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_amp("auto", torch.device("cpu")) is expected
    for forced, expected in (("1", torch.bfloat16), ("0", None)):  # SEGTRAIN_NATIVE_BF16 overrides the detection
        monkeypatch.setenv(NATIVE_BF16_ENV, forced)
        assert resolve_amp("auto", torch.device("cpu")) is expected
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=r"SEGTRAIN_NATIVE_BF16='yes'; valid: 0, 1"):
        resolve_amp("auto", torch.device("cpu"))
    monkeypatch.delenv(NATIVE_BF16_ENV)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("none", None)):
        assert resolve_amp(name, torch.device("cpu")) is dtype and resolve_amp(name, torch.device("cuda")) is dtype
    with pytest.raises(ValueError, match=r"trainer.amp='bf61'; valid: auto, bf16, fp16, none"):
        resolve_amp("bf61", torch.device("cpu"))


def test_cuda_device_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="trainer.device='cuda' but CUDA is not available"):
        device_for("cuda")
    assert device_for("auto") == torch.device("cpu")


def test_bad_config_values_fail_before_training(compose_cfg, fast_overrides, tmp_path):
    cfg = compose_cfg(fast_overrides + ["trainer.monitor=val/mdice"])
    with pytest.raises(KeyError, match=r"trainer.monitor='val/mdice' is not a logged metric; valid: .*val/mDice"):
        train(cfg, tmp_path / "run")
    cfg = compose_cfg(fast_overrides + ["dataset.class_names=[a,b]"])
    with pytest.raises(ValueError, match=r"dataset.class_names has 2 names but dataset.num_classes=3"):
        train(cfg, tmp_path / "run2")
    cfg = compose_cfg(fast_overrides + [f"trainer.resume={tmp_path / 'nope.pt'}"])
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train(cfg, tmp_path / "run3")


@pytest.mark.slow
def test_compiled_channels_last_run_matches_eager_and_saves_plain_weights(compose_cfg, fast_overrides, tmp_path):
    train(compose_cfg(fast_overrides), tmp_path / "eager")
    train(compose_cfg(fast_overrides + ["trainer.compile=true", "trainer.channels_last=true"]), tmp_path / "run")
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    assert not any(k.startswith("_orig_mod") for k in state)
    model = build_model(compose_cfg(fast_overrides).model)
    model.load_state_dict(state)  # strict: every key matches the plain module
    eager, compiled = _scalars(tmp_path / "eager", "train/loss"), _scalars(tmp_path / "run", "train/loss")
    assert compiled.keys() == eager.keys() == {1, 2}
    # Step 1 runs the same weights on the same batch: only the kernels' rounding differs.
    assert compiled[1] == pytest.approx(eager[1], rel=1e-4) and compiled[2] == pytest.approx(eager[2], rel=1e-2)


def test_fp16_with_grad_scaler_and_clipping_trains_and_resumes_exactly(compose_cfg, fast_overrides, tmp_path):
    """trainer.amp=fp16 on CPU enables torch.amp.GradScaler("cpu"): its scale is saved and restored."""
    common = fast_overrides + ["trainer.amp=fp16", "trainer.grad_clip=0.5", "trainer.log_every=1"]
    train(compose_cfg(common + ["trainer.max_steps=null"]), tmp_path / "full")
    train(compose_cfg(common + ["trainer.max_steps=2"]), tmp_path / "stopped")  # mid-epoch: 2 of 4 steps
    train(compose_cfg(common + ["trainer.max_steps=null",
                                f"trainer.resume={tmp_path / 'stopped/checkpoints/last.pt'}"]), tmp_path / "resumed")
    full = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    resumed = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    assert full["scaler"]["scale"] > 0 and full["train_state"]["step"] == resumed["train_state"]["step"] == 4
    losses = _scalars(tmp_path / "full", "train/loss")
    assert losses.keys() == {1, 2, 3, 4} and all(np.isfinite(list(losses.values())))
    model = build_model(compose_cfg(fast_overrides).model)
    digests = []
    for ckpt in (full, resumed, load_checkpoint(tmp_path / "stopped/checkpoints/last.pt")):
        model.load_state_dict(ckpt["model"])
        digests.append(parameters_digest(model))
    assert digests[0] == digests[1] != digests[2]  # steps 3 and 4 moved the weights, identically
    assert resumed["scaler"] == full["scaler"]


def test_eval_every_evaluates_every_n_epochs_and_at_the_end(compose_cfg, fast_overrides, tmp_path):
    train(compose_cfg(fast_overrides + ["trainer.epochs=3", "trainer.eval_every=2", "trainer.max_steps=null"]),
          tmp_path / "run")
    # 8 images / batch 2 = 4 steps per epoch: evaluations after epoch 2 (step 8) and the last (step 12).
    assert sorted(_scalars(tmp_path / "run", "val/mDice")) == [8, 12]
    assert sorted(_scalars(tmp_path / "run", "train/loss")) == list(range(1, 13))


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_mask_of_another_size_stops_the_run_before_its_first_step(tmp_path, compose_cfg, split):
    """One pass over the pairs checks every image header against its mask before training starts."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for i in range(6):
            (root / "images" / part).mkdir(parents=True, exist_ok=True)
            (root / "masks" / part).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "images" / part / f"{i}.png")
            height = 20 if (part == split and i == 4) else 32
            Image.fromarray(rng.integers(0, 2, (height, 40), dtype=np.uint8)).save(root / "masks" / part / f"{i}.png")
    cfg = compose_cfg(["debug=fast", "dataset=folder", f"dataset.root={root}", "dataset.num_classes=2"])
    with pytest.raises(ValueError) as err:
        train(cfg, tmp_path / "run")
    assert str(err.value) == (f"{root / 'masks' / split / '4.png'}: mask size 40x20 differs from image 4.png "
                              "size 40x32")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tensorboard").exists()
