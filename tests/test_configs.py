"""Every config file composes through Hydra, instantiates into working objects, and every
experiment trains under ``debug=fast``. (Loss and weights files are run term by term and
strategy by strategy in test_losses.py and test_weights.py.)"""

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain.build import build_data, build_model, inference_options
from segtrain.checkpoint import load_checkpoint
from segtrain.config import CONFIG_DIR, compose_config
from segtrain.optim import param_groups
from segtrain.train import train


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_has_its_first_members():
    assert {"unet", "deeplabv3plus"} <= set(_options("model"))
    assert {"synthetic", "folder", "voc", "cityscapes"} <= set(_options("dataset"))
    assert {"ce", "focal", "dice", "ce_dice", "focal_dice"} <= set(_options("loss"))
    assert {"adamw", "sgd"} <= set(_options("optimizer"))
    assert {"poly", "cosine", "none"} <= set(_options("scheduler"))
    assert {"default"} <= set(_options("trainer"))
    assert {"fast"} <= set(_options("debug"))
    assert {"default"} <= set(_options("inference"))
    assert _options("experiment")


@pytest.mark.parametrize("name", _options("model"))
def test_model_configs_instantiate(compose_cfg, name):
    cfg = compose_cfg([f"model={name}"])
    model = build_model(cfg.model)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, cfg.model.in_channels, 64, 64))
    assert out.shape == (1, cfg.dataset.num_classes, 64, 64)


@pytest.mark.parametrize("optimizer", _options("optimizer"))
@pytest.mark.parametrize("scheduler", _options("scheduler"))
def test_optimizer_and_scheduler_configs_instantiate(compose_cfg, optimizer, scheduler):
    cfg = compose_cfg([f"optimizer={optimizer}", f"scheduler={scheduler}"])
    model = torch.nn.Conv2d(3, 2, 1)
    opt = instantiate(cfg.optimizer)(param_groups(model, cfg.optimizer.weight_decay))
    sched = instantiate(cfg.scheduler)(opt, total_steps=10)
    assert sched.get_last_lr()[0] == pytest.approx(cfg.optimizer.lr)


def test_dataset_configs_build(compose_cfg, tmp_path, fast_overrides):
    data = build_data(compose_cfg(fast_overrides).dataset)
    assert len(data.train_set) == 8 and len(data.val_set) == 4
    assert data.train_counts.shape == (8, 3) and data.stats.num_images == 8
    cfg = compose_cfg(["dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.num_classes=3"])
    image, mask = build_data(cfg.dataset).train_set[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)


def test_inference_config_builds_options(compose_cfg):
    options = inference_options(compose_cfg(["inference.mode=slide", "dataset.augment.crop_size=[96,128]"]),
                                torch.device("cpu"))
    assert options.mode == "slide" and options.tile == (96, 128) and options.amp_dtype is None
    assert inference_options(compose_cfg([]), torch.device("cpu")).tile == (512, 512)  # no crop: 512
    assert compose_config([], config_name="predict").save.color is True


def test_debug_config_applies(compose_cfg):
    cfg = compose_cfg(["debug=fast"])
    assert cfg.trainer.device == "cpu" and cfg.trainer.num_workers == 0 and cfg.trainer.max_steps == 2
    assert cfg.dataset.generate.num_train == 8 and cfg.dataset.root == "data/synthetic_fast"
    # With another dataset on the command line, debug=fast keeps its trainer settings and nothing
    # of the synthetic set: no generate section, which would write synthetic files into the folder.
    cfg = compose_cfg(["debug=fast", "dataset=folder", "dataset.root=/data/mine", "dataset.num_classes=2"])
    assert cfg.dataset.name == "folder" and "generate" not in cfg.dataset and cfg.trainer.max_steps == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", _options("experiment"))
def test_every_experiment_trains_under_debug_fast(compose_cfg, fast_overrides, tmp_path, name):
    """Composed, resolved, and trained for debug=fast's two steps, with the experiment's deltas in force."""
    cfg = compose_cfg([f"experiment={name}", *fast_overrides])
    OmegaConf.resolve(cfg)  # no dangling interpolation
    overrides = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml").get("defaults", [])
    train(cfg, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    saved = OmegaConf.create(ckpt["config"])
    assert ckpt["train_state"]["step"] == 2
    for override in overrides:  # e.g. {"override /loss": "focal_dice"}: the run used that option
        ((key, option),) = override.items()
        group = key.split("/")[-1]
        assert saved[group] == OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"), (group, option)
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["steps"] == 2 and "val/dice/spot" in metrics["final"]


def test_typos_fail_with_the_valid_options(compose_cfg):
    with pytest.raises(MissingConfigException, match=r"(?s)focal_dcie.*Available options.*focal_dice"):
        compose_cfg(["loss=focal_dcie"])
    with pytest.raises(ConfigCompositionException, match="trainer.epochz"):
        compose_cfg(["trainer.epochz=3"])
