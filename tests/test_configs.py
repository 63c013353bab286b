"""Every config file composes through Hydra and instantiates into working objects."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain.losses import build_loss
from segtrain.optim import param_groups
from segtrain.train import build_datasets, build_model
from segtrain.weights import ClassStats, compute_class_weights

from conftest import CONFIG_DIR


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_has_its_first_members():
    assert {"unet", "deeplabv3plus"} <= set(_options("model"))
    assert {"synthetic", "folder"} <= set(_options("dataset"))
    assert {"ce", "focal", "dice", "ce_dice", "focal_dice"} <= set(_options("loss"))
    assert {"none", "inverse_freq", "median_freq"} <= set(_options("weights"))
    assert {"adamw", "sgd"} <= set(_options("optimizer"))
    assert {"poly", "cosine", "none"} <= set(_options("scheduler"))
    assert {"default"} <= set(_options("trainer"))
    assert {"fast"} <= set(_options("debug"))
    assert _options("experiment")


@pytest.mark.parametrize("name", _options("model"))
def test_model_configs_instantiate(compose_cfg, name):
    cfg = compose_cfg([f"model={name}"])
    model = build_model(cfg.model)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, cfg.model.in_channels, 64, 64))
    assert out.shape == (1, cfg.dataset.num_classes, 64, 64)


@pytest.mark.parametrize("name", _options("loss"))
def test_loss_configs_build(compose_cfg, name):
    cfg = compose_cfg([f"loss={name}"])
    loss_fn = build_loss(cfg.loss, torch.tensor([0.5, 1.0, 2.0]), num_classes=3, ignore_index=255)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = loss_fn(logits, torch.randint(0, 3, (2, 8, 8)))
    out["loss"].backward()
    assert set(out) == {"loss", *cfg.loss.terms.keys()}
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", _options("weights"))
def test_weight_configs_compute(compose_cfg, name):
    overrides = [f"weights={name}"] + (["weights.values=[1.0,2.0,3.0]"] if name == "manual" else [])
    cfg = compose_cfg(overrides)
    stats = ClassStats(pixel_count=np.array([70, 20, 10]), image_count=np.array([2, 2, 1]),
                       present_pixel_count=np.array([100, 100, 50]), total_pixels=100, num_images=2)
    weights = compute_class_weights(stats, **cfg.weights)
    assert weights.shape == (3,) and torch.isfinite(weights).all() and (weights > 0).all()


@pytest.mark.parametrize("optimizer", _options("optimizer"))
@pytest.mark.parametrize("scheduler", _options("scheduler"))
def test_optimizer_and_scheduler_configs_instantiate(compose_cfg, optimizer, scheduler):
    cfg = compose_cfg([f"optimizer={optimizer}", f"scheduler={scheduler}"])
    model = torch.nn.Conv2d(3, 2, 1)
    opt = instantiate(cfg.optimizer)(param_groups(model, cfg.optimizer.weight_decay))
    sched = instantiate(cfg.scheduler)(opt, total_steps=10)
    assert sched.get_last_lr()[0] == pytest.approx(cfg.optimizer.lr)


def test_dataset_configs_build(compose_cfg, tmp_path, fast_overrides):
    cfg = compose_cfg(fast_overrides)
    train_set, val_set = build_datasets(cfg.dataset)
    assert len(train_set) == 8 and len(val_set) == 4
    cfg = compose_cfg(["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3"])
    train_set, _ = build_datasets(cfg.dataset)
    image, mask = train_set[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)


def test_debug_and_experiment_configs_apply(compose_cfg):
    cfg = compose_cfg(["debug=fast"])
    assert cfg.trainer.device == "cpu" and cfg.trainer.num_workers == 0 and cfg.trainer.max_steps == 2
    for name in _options("experiment"):
        cfg = compose_cfg([f"experiment={name}"])
        OmegaConf.resolve(cfg)  # no dangling interpolation


def test_typos_fail_with_the_valid_options(compose_cfg):
    with pytest.raises(MissingConfigException, match=r"(?s)focal_dcie.*Available options.*focal_dice"):
        compose_cfg(["loss=focal_dcie"])
    with pytest.raises(ConfigCompositionException, match="trainer.epochz"):
        compose_cfg(["trainer.epochz=3"])
