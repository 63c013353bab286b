"""timm encoders (the timm extra): ``model.encoder=timm:<name>`` under UNet and DeepLabV3+, built from timm's own
feature pyramids, with local or hub weights, trained, resumed, predicted, calibrated and exported.

The backbones are timm's tiny random-init test models (and RegNetX-200MF): resnet, efficientnet, convnext
(first level at stride 4), regnet and mambaout (channels-last features, a stride-4 stem)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from segtrain import calibrate, export, predict
from segtrain.build import build_model
from segtrain.checkpoint import load_checkpoint, save_checkpoint
from segtrain.config import compose_config
from segtrain.config.options import adopt_encoder_normalisation, check_config
from segtrain.distributed import parameters_digest
from segtrain.models import DeepLabV3Plus, UNet
from segtrain.models.timm_encoder import build_timm_encoder
from segtrain.train import train

timm = pytest.importorskip("timm", reason="the timm extra is part of dev: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"resnet": "timm:test_resnet", "efficientnet": "timm:test_efficientnet", "convnext": "timm:test_convnext",
            "regnet": "timm:regnetx_002", "mambaout": "timm:test_mambaout"}
SMALL = [32, 16, 16, 8, 8]
ARCHS = {"unet": (UNet, {"decoder_channels": SMALL}), "dlv3p-os16": (DeepLabV3Plus, {"output_stride": 16}),
         "dlv3p-os8": (DeepLabV3Plus, {"output_stride": 8})}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_at_an_odd_size_gives_full_resolution_logits(family, arch):
    cls, kwargs = ARCHS[arch]
    if family == "mambaout" and cls is DeepLabV3Plus:  # timm cannot dilate it: refused, naming what it can
        with pytest.raises(ValueError, match=r"cannot be built with output_stride=\d+ .*; it can with output_stride 32"):
            cls(num_classes=3, encoder=FAMILIES[family], **kwargs)
        return
    torch.manual_seed(0)
    model = cls(num_classes=3, encoder=FAMILIES[family], **kwargs).train()
    logits = model(torch.randn(2, 3, 37, 45))
    assert logits.shape == (2, 3, 37, 45)
    logits.square().mean().backward()
    encoder_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert encoder_grads and all(g is not None and torch.isfinite(g).all() for g in encoder_grads)
    assert any(g.abs().sum() > 0 for g in encoder_grads)


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("family", ["resnet", "efficientnet", "convnext", "regnet", "mambaout"])
def test_levels_are_timms_own_features_in_order(family, output_stride):
    """The encoder's levels are timm's features_only outputs, shallow to deep, with the channels and strides of
    its feature_info (an encoder that reorders them, or takes a level's channels from another, fails here)."""
    name = FAMILIES[family][len("timm:"):]
    if family == "mambaout" and output_stride != 32:
        return
    kwargs = {} if output_stride == 32 else {"output_stride": output_stride}
    reference = timm.create_model(name, features_only=True, **kwargs).eval()
    encoder = build_timm_encoder(FAMILIES[family], output_stride=output_stride).eval()
    encoder.body.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = encoder(x), reference(x)
    if family == "mambaout":  # timm gives these channels last
        theirs = [f.permute(0, 3, 1, 2) for f in theirs]
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert list(encoder.channels) == reference.feature_info.channels() == [f.shape[1] for f in ours]
    assert list(encoder.strides) == reference.feature_info.reduction() == [64 // f.shape[-2] for f in ours]
    assert encoder.strides[-1] == output_stride


def test_what_cannot_be_a_segmentation_encoder_is_refused_naming_why(monkeypatch):
    with pytest.raises(ValueError, match=r"timm [\d.]+ has no model 'resnet_18'; close: resnet18"):
        UNet(num_classes=3, encoder="timm:resnet_18")
    with pytest.raises(ValueError, match=r"gives its levels at strides \(16, 16, 16\): UNet and DeepLabV3\+ need a "
                                         r"pyramid"):
        UNet(num_classes=3, encoder="timm:test_vit")
    with pytest.raises(ValueError, match=r"does not run at an input size other than its own \(64x96 here: "):
        UNet(num_classes=3, encoder="timm:test_maxvit")
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    with pytest.raises(ImportError, match=r"timm is not installed; pip install -e '\.\[timm\]'"):
        UNet(num_classes=3, encoder="timm:test_resnet")


def _timm_state(name: str, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()


def test_a_local_weights_file_is_loaded_and_a_wrong_one_refused_naming_keys(tmp_path):
    from safetensors.torch import save_file

    state = _timm_state("test_resnet")
    torch.save({"state_dict": state}, tmp_path / "resnet.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "resnet.safetensors"))
    model = UNet(num_classes=3, encoder="timm:test_resnet", encoder_weights=str(tmp_path / "resnet.pth"))
    loaded = model.encoder.body.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded if not k.endswith("num_batches_tracked"))
    grey = UNet(num_classes=3, in_channels=1, encoder="timm:test_resnet",
                encoder_weights=str(tmp_path / "resnet.safetensors"))
    first = grey.encoder.body.state_dict()["conv1.0.weight"]
    assert torch.equal(first, timm.models.adapt_input_conv(1, state["conv1.0.weight"]))  # as timm adapts RGB
    torch.save(_timm_state("test_convnext"), tmp_path / "convnext.pth")
    with pytest.raises(RuntimeError, match=r"convnext.pth do not match timm's test_resnet: \d+ missing keys, first: "
                                           r"conv1\.0\.weight.*\d+ unexpected keys, first: stem\.0\.weight"):
        UNet(num_classes=3, encoder="timm:test_resnet", encoder_weights=str(tmp_path / "convnext.pth"))


HUB = """
import os, sys, torch
from pathlib import Path
import segtrain, timm
from safetensors.torch import save_file
from segtrain.models import UNet
repo = Path(os.environ["HF_HOME"]) / "hub" / "models--timm--test_resnet.r160_in1k"
(repo / "refs").mkdir(parents=True)
(repo / "refs" / "main").write_text("0" * 40)
(repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
torch.manual_seed(5)
source = timm.create_model("test_resnet").state_dict()
save_file({k: v.contiguous() for k, v in source.items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
model = UNet(num_classes=3, encoder="timm:test_resnet", encoder_weights="imagenet")
assert torch.equal(model.encoder.body.state_dict()["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
try:
    UNet(num_classes=3, encoder="timm:test_convnext", encoder_weights="imagenet")
except RuntimeError as err:
    print(err)
"""


def test_imagenet_weights_come_from_timms_hub_cache_and_offline_say_so(tmp_path):
    """encoder_weights=imagenet: timm's default pretrained tag through the Hugging Face cache (offline here)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HUB], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "timm:test_convnext: timm could not load its pretrained weights" in proc.stdout
    assert "give encoder_weights=<local file>" in proc.stdout


def test_pretrained_normalisation_is_adopted_when_left_at_the_defaults(tmp_path, caplog):
    torch.save(_timm_state("test_resnet"), tmp_path / "w.pth")
    common = ["debug=fast", "model.encoder=timm:test_resnet", f"model.encoder_weights={tmp_path / 'w.pth'}"]
    cfg = compose_config(common)
    adopt_encoder_normalisation(cfg)
    assert list(cfg.dataset.mean) == list(cfg.dataset.std) == [0.5, 0.5, 0.5]  # timm's pretrained_cfg for it
    mine = compose_config(common + ["dataset.mean=[0.4,0.4,0.4]"])
    adopt_encoder_normalisation(mine)
    assert list(mine.dataset.mean) == [0.4, 0.4, 0.4] and "kept as set, though timm:test_resnet" in caplog.text
    scratch = compose_config(["debug=fast", "model.encoder=timm:test_resnet"])
    adopt_encoder_normalisation(scratch)
    assert list(scratch.dataset.mean) == [0.485, 0.456, 0.406]  # random init: nothing to match


def test_an_unknown_timm_name_stops_before_the_data_pass(tmp_path):
    with pytest.raises(ValueError, match="has no model 'resnet_18'"):
        check_config(compose_config(["debug=fast", f"dataset.root={tmp_path / 'data'}", "model.encoder=timm:resnet_18"]))
    assert not (tmp_path / "data").exists()


def _digest(path: Path, cfg) -> str:
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(path)["model"])
    return parameters_digest(model)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """``python -m segtrain`` with a timm encoder (bf16, channels_last, EMA), 4 steps; the same run stopped at
    step 2 and resumed in process."""
    tmp = tmp_path_factory.mktemp("timm")
    common = ["debug=fast", f"dataset.root={tmp / 'data'}", "model.encoder=timm:test_resnet",
              f"model.decoder_channels=[{','.join(map(str, SMALL))}]", "trainer.amp=bf16", "trainer.channels_last=true",
              "trainer.ema.decay=0.9", "trainer.max_steps=null", "trainer.log_every=1"]
    proc = subprocess.run([sys.executable, "-m", "segtrain", *common, f"hydra.run.dir={tmp / 'cli'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(compose_config(common + ["trainer.max_steps=2"]), tmp / "stopped")
    train(compose_config(common + [f"trainer.resume={tmp / 'stopped/checkpoints/last.pt'}"]), tmp / "resumed")
    return tmp, compose_config(common)


def test_a_timm_run_trains_through_the_command_and_resumes_identically(timm_run):
    tmp, cfg = timm_run
    metrics = json.loads((tmp / "cli/metrics.json").read_text())
    assert metrics["steps"] == 4 and torch.isfinite(torch.tensor(metrics["final"]["val/loss"]))
    straight, resumed = tmp / "cli/checkpoints/last.pt", tmp / "resumed/checkpoints/last.pt"
    assert _digest(straight, cfg) == _digest(resumed, cfg)
    assert "ema" in load_checkpoint(straight)


def test_a_timm_checkpoint_predicts_in_windows_and_calibrates(timm_run, tmp_path):
    tmp, _ = timm_run
    ckpt = tmp / "cli/checkpoints/last.pt"
    assert predict.main([f"checkpoint={ckpt}", f"input={tmp / 'data/images/val'}", f"output={tmp_path / 'pred'}",
                         "inference.mode=slide", "inference.tile=32", "progress=false"]) == 0
    assert len(list((tmp_path / "pred").glob("val_*[0-9].png"))) == 4
    assert calibrate.main([f"checkpoint={ckpt}", f"output={tmp_path / 'cal.pt'}"]) == 0
    assert load_checkpoint(tmp_path / "cal.pt")["calibration"]["temperature"] > 0


def _checkpoint_of(encoder: str, path: Path) -> Path:
    overrides = ["debug=fast", f"model.encoder={encoder}", f"model.decoder_channels=[{','.join(map(str, SMALL))}]"]
    cfg = compose_config(overrides)
    torch.manual_seed(1)
    model = build_model(cfg.model)
    return save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True),
                            "overrides": overrides, "class_names": ["background", "region", "spot"]}, path)


@pytest.mark.parametrize("encoder, file_format", [("timm:test_resnet", "onnx"), ("timm:test_convnext", "onnx"),
                                                  ("timm:test_convnext", "torch_export")])
def test_export_of_a_timm_model_is_verified_at_two_sizes(encoder, file_format, tmp_path):
    """Verified means: the file run (ONNX Runtime, torch.export.load) at 64x96 and at 45x70 against PyTorch."""
    ckpt = _checkpoint_of(encoder, tmp_path / "model.pt")
    out = tmp_path / ("model.onnx" if file_format == "onnx" else "model.pt2")
    assert export.main([f"checkpoint={ckpt}", f"format={file_format}", f"output={out}", "size=[64,96]",
                        "verify_size=[45,70]"]) == 0
    assert out.is_file() and not (tmp_path / f"model.unverified{out.suffix}").exists()


@pytest.mark.slow
def test_compiled_and_synced_timm_models_compute_what_eager_does():
    torch.manual_seed(0)
    model = UNet(num_classes=3, encoder="timm:test_efficientnet", decoder_channels=SMALL).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.compile(model)(x), eager, rtol=1e-4, atol=1e-5)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
