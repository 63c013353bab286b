"""A checkpoint is data: what its stored config names is built from segtrain's registry or refused, in every
command that reads one (predict, evaluate, export, calibrate, Predictor.from_checkpoint); nor do the
inference commands generate data at a dataset root read from a checkpoint."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from segtrain import calibrate, evaluate, export, predict
from segtrain.build import build_model, model_from_checkpoint
from segtrain.checkpoint import load_checkpoint, read_with_overrides, save_checkpoint
from segtrain.config import compose_config
from segtrain.config.trust import UntrustedConfig
from segtrain.models import registry
from segtrain.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def payload(tmp_path):
    """A local hub repository whose entry point writes a marker file: what a crafted checkpoint would run."""
    hub = tmp_path / "hub"
    hub.mkdir()
    marker = tmp_path / "marker"
    (hub / "hubconf.py").write_text(
        "import pathlib, torch\n"
        f"def m(*args, **kwargs):\n    pathlib.Path({str(marker)!r}).write_text('ran')\n    return torch.nn.Identity()\n")
    call = {"_target_": "torch.hub.load", "repo_or_dir": str(hub), "model": "m", "source": "local", "trust_repo": True}
    return call, marker


def _crafted(trained: Path, tmp_path: Path, edit, name: str = "crafted.pt") -> Path:
    ckpt = load_checkpoint(trained / "run/checkpoints/last.pt")
    config = OmegaConf.create(ckpt["config"])
    edit(config, ckpt)
    ckpt["config"] = OmegaConf.to_yaml(config)
    return save_checkpoint(ckpt, tmp_path / name)


def _commands(ckpt: Path, trained: Path, tmp_path: Path):
    """Each command as a user runs it (its ``main``), on ``ckpt``."""
    images = trained / "data/images/val"
    return {
        "predict": lambda: predict.main([f"checkpoint={ckpt}", f"input={images}", f"output={tmp_path / 'pred'}",
                                         "progress=false"]),
        "evaluate": lambda: evaluate.main([f"checkpoint={ckpt}", f"report.dir={tmp_path / 'report'}"]),
        "export": lambda: export.main([f"checkpoint={ckpt}", "format=torch_export", f"output={tmp_path / 'm.pt2'}",
                                       "--no-verify"]),
        "calibrate": lambda: calibrate.main([f"checkpoint={ckpt}", f"output={tmp_path / 'cal.pt'}"]),
    }


def _craft(name: str, call: dict):
    """An edit of a checkpoint's config and stored command line that names the payload ``call`` (or a Hydra key)."""
    args = {"_target_": "torch.hub.load", "_args_": [call["repo_or_dir"], "m"], "source": "local", "trust_repo": True}
    where, value = {"top": ("model", call), "nested": ("model.freeze_bn", call), "args": ("model", args),
                    "partial": ("model._partial_", True), "stored_override": (None, None)}[name]

    def edit(config, ckpt):
        if where is None:
            ckpt["overrides"] = [*ckpt["overrides"], "model._target_=torch.hub.load"]
        else:
            OmegaConf.update(config, where, value, merge=False, force_add=True)
    return edit


@pytest.mark.parametrize("craft, key", [("top", "model._target_"), ("nested", "model.freeze_bn._target_"),
                                        ("args", "model._target_"), ("partial", "model._partial_"),
                                        ("stored_override", "model._target_")])
def test_a_checkpoint_naming_code_is_refused_by_every_command(trained, tmp_path, capsys, payload, craft, key):
    call, marker = payload
    ckpt = _crafted(trained, tmp_path, _craft(craft, call))
    for name, command in _commands(ckpt, trained, tmp_path).items():
        assert command() == 2, name
        assert not marker.exists(), f"{name} ran the checkpoint's code"
        err = capsys.readouterr().err
        assert "crafted.pt: its stored" in err and f"sets {key}=" in err and "may not name code to run" in err, err
    with pytest.raises(UntrustedConfig, match=f"sets {key}="):
        Predictor.from_checkpoint(ckpt)
    assert not marker.exists()
    assert not (tmp_path / "cal.pt").exists() and not (tmp_path / "m.pt2").exists()


def test_the_real_command_line_refuses_it_too(trained, tmp_path, payload):
    call, marker = payload
    ckpt = _crafted(trained, tmp_path, _craft("top", call))
    proc = subprocess.run([sys.executable, "-m", "segtrain.predict", f"checkpoint={ckpt}",
                           f"input={trained / 'data/images/val'}", f"output={tmp_path / 'pred'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert proc.returncode == 2 and "sets model._target_='torch.hub.load'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "pred").exists()


def test_the_users_own_command_line_and_registered_classes_are_theirs(trained, tmp_path, payload):
    """A target the user types (or registers in code) is theirs to run; the same value from the file is not."""
    call, marker = payload
    ckpt = _crafted(trained, tmp_path, _craft("top", call))
    saved, cfg = read_with_overrides(ckpt, ["model=unet", "model.encoder=resnet18"])  # the user replaces the model
    assert cfg.model._target_ == "segtrain.models.UNet" and not marker.exists()

    class Wrapped(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.net = build_model(OmegaConf.create({**kwargs, "_target_": "segtrain.models.UNet"}))

        def forward(self, x):
            return self.net(x)

    target = f"{Wrapped.__module__}.{Wrapped.__qualname__}"
    def rename(config, ckpt):
        config.model._target_ = target
        ckpt["model"] = {f"net.{k}": v for k, v in ckpt["model"].items()}

    mine = _crafted(trained, tmp_path, rename, "mine.pt")
    with pytest.raises(UntrustedConfig, match="register its class"):
        Predictor.from_checkpoint(mine)
    registry.register_model(Wrapped)
    try:
        probs = Predictor.from_checkpoint(mine)(np.zeros((40, 40, 3), np.uint8))
    finally:
        registry._MODELS.pop(target)
    assert probs.shape == (3, 40, 40)


@pytest.mark.parametrize("model", ["unet", "deeplabv3plus"])
def test_a_checkpoint_of_each_shipped_model_loads(tmp_path, model):
    overrides = ["debug=fast", f"model={model}", "model.encoder=resnet18"]
    cfg = compose_config(overrides)
    net = build_model(cfg.model)
    ckpt = {"model": net.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True), "overrides": overrides,
            "class_names": ["background", "region", "spot"]}
    path = save_checkpoint(ckpt, tmp_path / "m.pt")
    saved, cfg = read_with_overrides(path)
    loaded = model_from_checkpoint(saved, cfg).eval()
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    assert type(loaded) is type(net)


def test_inference_commands_never_generate_data_at_a_root_read_from_the_checkpoint(trained, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"

    def move(config, ckpt):
        config.dataset.root = str(elsewhere)

    ckpt = _crafted(trained, tmp_path, move)
    commands = {"evaluate": lambda: evaluate.main([f"checkpoint={ckpt}", f"report.dir={tmp_path / 'report'}"]),
                "calibrate": lambda: calibrate.main([f"checkpoint={ckpt}", f"output={tmp_path / 'c.pt'}"])}
    for name, command in commands.items():
        assert command() == 2, name
        err = capsys.readouterr().err
        assert f"{elsewhere}: no synthetic dataset there" in err and "read from the checkpoint" in err, err
        assert not elsewhere.exists(), name
    # A root the user gives is theirs: the set is generated there.
    metrics, _ = evaluate.evaluate_checkpoint(ckpt, [f"dataset.root={elsewhere}"], report=False)
    assert (elsewhere / "synthetic.json").is_file() and np.isfinite(metrics["loss"])
