"""Every config file composes through Hydra, instantiates into working objects, and every
experiment trains under ``debug=fast``. (Loss and weights files are run term by term and
strategy by strategy in test_losses.py and test_weights.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from segtrain.build import build_data, build_model
from segtrain.checkpoint import load_checkpoint
from segtrain.config import CONFIG_DIR, compose_config, load_option
from segtrain.config.options import inference_options
from segtrain.train import train
from segtrain.training.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]


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
    assert cfg.dataset.name == "folder" and cfg.dataset.get("generate") is None and cfg.trainer.max_steps == 2


def _binary_folder(root: Path, size: int = 64) -> Path:
    """8 train and 4 val image/mask pairs in the folder layout: a bright disc (class 1) on a dark background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for split, count in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            cy, cx, r = rng.integers(16, 48), rng.integers(16, 48), rng.integers(4, 12)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
            image = (rng.normal(60, 10, (size, size, 3)) + 120 * mask[..., None]).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", _options("experiment"))
def test_every_experiment_trains_under_debug_fast(compose_cfg, fast_overrides, tmp_path, name):
    """Composed, resolved, and trained for debug=fast's two steps, with the experiment's deltas in force. ImageNet
    weights cannot be downloaded here (random init instead); debug=fast trains on its synthetic set, except the
    binary recipe, which gets a binary folder dataset made here."""
    extra = ["model.encoder_weights=null"]
    if name == "small_binary":
        extra += ["dataset=folder", f"dataset.root={_binary_folder(tmp_path / 'binary')}"]
    cfg = compose_cfg([f"experiment={name}", *fast_overrides, *extra])
    OmegaConf.resolve(cfg)  # no dangling interpolation
    overrides = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml").get("defaults", [])
    train(cfg, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    saved = OmegaConf.create(ckpt["config"])
    assert ckpt["train_state"]["step"] == 2
    recipe = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
    for override in overrides:  # e.g. {"override /loss": "focal_dice"}: the run used that option
        ((key, option),) = override.items()
        group = key.split("/")[-1]
        if group in ("dataset", "model"):  # debug=fast replaces the dataset; the model: the keys below
            continue
        expected = OmegaConf.merge(load_option(group, option), recipe.get(group) or {})
        assert OmegaConf.to_container(saved[group]) == OmegaConf.to_container(expected), (group, option)
    models = [option for override in overrides for key, option in override.items() if key.endswith("/model")]
    if models:
        assert saved.model._target_ == load_option("model", models[0])._target_
    for key in ("trainer.steps", "trainer.monitor", "optimizer.lr", "model.encoder", "model.output_stride"):
        if OmegaConf.select(recipe, key) is not None:  # the recipe's values are in force
            assert OmegaConf.select(saved, key) == OmegaConf.select(recipe, key), key
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["steps"] == 2 and saved.trainer.monitor in metrics["final"]


def test_typos_fail_with_the_valid_options(compose_cfg):
    with pytest.raises(MissingConfigException, match=r"(?s)focal_dcie.*Available options.*focal_dice"):
        compose_cfg(["loss=focal_dcie"])
    with pytest.raises(ConfigCompositionException, match="trainer.epochz"):
        compose_cfg(["trainer.epochz=3"])


SCHEMA_ERRORS = [  # (override, the key OmegaConf names, what it says was expected)
    ("trainer.batch_size=eight", "trainer.batch_size", "could not be converted to Integer"),
    ("trainer.amp=fp17", "trainer.amp", "expected one of [auto, bf16, fp16, none]"),
    ("dataset.on_bad_label=maybe", "dataset.on_bad_label", "expected one of [error, ignore]"),
    ("trainer.epocs=3", "trainer.epocs", "Key 'epocs' not in 'TrainerConfig'"),
    ("trainer.on_nonfinite=retry", "trainer.on_nonfinite", "expected one of [stop, skip, rollback]"),
    ("weights.absent=drop", "weights.absent", "expected one of [zero, error]"),
    ("scheduler.name=linear", "scheduler.name", "expected one of [poly, cosine, none]"),
    ("optimizer.lr=fast", "optimizer.lr", "could not be converted to Float"),
    ("model.output_stride=16", "model.output_stride", "Key 'output_stride' not in 'UNetConfig'"),  # a DeepLabV3+ key on the UNet
    ("dataset.augment.hflip=sometimes", "dataset.augment.hflip", "is not a valid bool"),
]


@pytest.mark.parametrize("override,key,expected", SCHEMA_ERRORS, ids=[e[0] for e in SCHEMA_ERRORS])
def test_composition_refuses_a_wrong_type_choice_or_key_and_names_it(compose_cfg, override, key, expected):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override])
    message = f"{err.value}\n{err.value.__cause__}"
    assert f"full_key: {key}\n" in message and expected in message, message


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=eight", "full_key: trainer.batch_size"),  # composition (schema)
    ("trainer.monitor=val/mdice", "trainer.monitor='val/mdice' is not a logged metric; valid:"),  # check_config
    ("trainer.keep_last=0", "trainer.keep_last=0: expected a number of checkpoints >= 1"),
    ("dataset.class_names=[a,b]", "dataset.class_names has 2 names but dataset.num_classes=3"),
    ("dataset.num_classes=1", "dataset.num_classes=1: expected a number of classes (binary data: 2, background and "
                              "foreground) >= 2"),
])
def test_a_bad_value_stops_the_command_before_its_run_directory_exists(tmp_path, override, message):
    """Checked by composition or by check_config in Hydra's on_run_start: nothing is written, not even the folder."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "segtrain", "debug=fast", f"dataset.root={tmp_path / 'data'}",
                           override, f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert not run.exists() and not (tmp_path / "data").exists()


def test_choices_compare_and_print_as_their_strings(compose_cfg):
    cfg = compose_cfg(["debug=fast", "trainer.amp=bf16"])
    amp = cfg.trainer.amp
    assert amp == "bf16" and str(amp) == "bf16" and f"{amp}" == "bf16" and json.dumps(amp) == '"bf16"'
    assert OmegaConf.to_yaml(cfg.trainer).count("amp: bf16") == 1


def test_load_option_equals_the_composed_group(compose_cfg):
    for group, option in [("weights", "effective_num"), ("dataset", "synthetic_fast"), ("model", "deeplabv3plus"),
                          ("trainer", "default"), ("loss", "focal_dice"), ("optimizer", "sgd")]:
        composed = compose_cfg([f"{group}={option}"])[group]
        assert OmegaConf.to_container(load_option(group, option)) == OmegaConf.to_container(composed), (group, option)


@pytest.mark.parametrize("choice, module_list", [
    ("Amp", "segtrain.runtime.AMP_CHOICES"), ("MonitorMode", "segtrain.training.early_stopping.MONITOR_MODES"),
    ("OnNonfinite", "segtrain.training.nonfinite.POLICIES"), ("OnBadLabel", "segtrain.data.masks.ON_BAD_LABEL"),
    ("Layout", "segtrain.data.LAYOUTS"), ("Strategy", "segtrain.data.class_weights.STRATEGIES"),
    ("Normalize", "segtrain.data.class_weights.NORMALIZE"), ("Absent", "segtrain.data.class_weights.ABSENT"),
    ("CountOf", "segtrain.data.class_weights.COUNT"), ("Schedule", "segtrain.training.optim.SCHEDULES"),
])
def test_each_choice_of_the_schema_is_the_one_its_module_takes(choice, module_list):
    """Library modules keep their own tuple (they do not import the config layer); composition must offer exactly it."""
    import importlib

    from segtrain.config import schema

    module, name = module_list.rsplit(".", 1)
    assert sorted(member.value for member in getattr(schema, choice)) == sorted(getattr(importlib.import_module(module),
                                                                                        name))

