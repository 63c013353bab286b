"""Config -> what runs: device and precision, seeds, workers, the model (from a config or a checkpoint), loss,
optimizer and schedule, the class-weight table's options."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segtrain import distributed
from segtrain.analysis.calibration import CalibratedModel, LogitCalibration
from segtrain.checkpoint import SavedModel
from segtrain.config import CONFIG_DIR, load_option
from segtrain.config.checks import check_class_count, is_multilabel
from segtrain.config.options import inference_options
from segtrain.data.class_stats import ChannelStats
from segtrain.data.class_weights import (STRATEGIES, channel_table, compute_channel_weights, compute_class_weights,
                                         weights_table)
from segtrain.inference import InferenceOptions
from segtrain.losses import CompositeLoss, build_loss
from segtrain.models import registry
from segtrain.runtime import Runtime
from segtrain.training.ema import WeightEma
from segtrain.training.optim import param_groups
from segtrain.training.parts import TrainParts

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- runtime


def inference_runtime(cfg: DictConfig) -> tuple[Runtime, InferenceOptions]:
    """What evaluate and calibrate run a checkpoint on, the same as ``segtrain.predict``: ``trainer.device``, and the
    precision ``inference.amp`` gives (``checkpoint``: the run's trainer.amp on CUDA, full precision on a CPU, even
    one whose native bf16 made the run train in bf16), so that the three agree on the same machine."""
    device = distributed.device_for(cfg.trainer.device)
    options = inference_options(cfg, device)
    return Runtime(device, options.amp_dtype, cfg.trainer.channels_last), options


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    if num_workers != "auto":
        return int(num_workers)
    cores = os.cpu_count() or 1
    # Training on a small CPU, loader workers steal cores from the convolutions (see
    # docs/BENCHMARKS.md); a GPU run leaves the cores free for decoding.
    if device.type == "cpu" and cores <= 4:
        return 0
    return min(8, cores)


# ---------------------------------------------------------------- tables


def weights_column_options() -> dict[str, dict]:
    """Each strategy's options from its ``configs/weights/<strategy>.yaml``, so the class-weight
    table's columns show what ``weights=<strategy>`` would give, not bare function defaults."""
    weights_dir = CONFIG_DIR / "weights"
    return {name: OmegaConf.to_container(load_option("weights", name), resolve=True)
            for name in STRATEGIES if name != "manual" and (weights_dir / f"{name}.yaml").is_file()}


def class_weights_of(stats, weights_cfg, class_names: list[str]) -> tuple[torch.Tensor, str]:
    """(the run's class weights, the table the log, TensorBoard and ``segtrain.stats`` show) of ``weights=...``:
    per class of a label map, or one positive-class weight per channel of multi-label data (``ChannelStats``)."""
    options = OmegaConf.to_container(weights_cfg, resolve=True) if OmegaConf.is_config(weights_cfg) else weights_cfg
    if isinstance(stats, ChannelStats):
        weights = compute_channel_weights(stats, class_names=class_names, **options)
        return weights, channel_table(stats, class_names, options["strategy"], weights)
    weights = compute_class_weights(stats, class_names=class_names, **options)
    return weights, weights_table(stats, class_names, options["strategy"], weights=weights,
                                  column_options=weights_column_options())


# ---------------------------------------------------------------- model, loss, optimizer


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """The model ``model_cfg._target_`` names, with the config's arguments (not ``sync_bn``): a registered class
    by its name (``segtrain.models.registry``), else through Hydra."""
    return registry.build_model(OmegaConf.to_container(model_cfg, resolve=True))


def model_from_checkpoint(saved: SavedModel, cfg: DictConfig) -> torch.nn.Module:
    """``cfg.model`` with the checkpoint's weights, on the CPU; with the checkpoint's temperature and bias
    (``segtrain.calibrate``) on its logits unless ``inference.calibrated=false``."""
    check_class_count(saved, cfg)
    model = build_model(cfg.model)
    try:
        model.load_state_dict(saved.weights)
    except RuntimeError as err:  # torch lists every mismatched tensor; the first lines name enough
        lines = str(err).splitlines()
        raise RuntimeError(f"{saved.path}: its weights do not fit the model its config builds "
                           f"({cfg.model.get('_target_')}): {' '.join(line.strip() for line in lines[:4])}") from err
    if saved.calibration is None or not cfg.inference.calibrated:
        return model
    cal = saved.calibration
    log.info("%s: logits / %.4f + bias %s, fitted on %s (inference.calibrated=false: not)", saved.path,
             cal["temperature"], [round(b, 4) for b in cal["bias"]], cal["fitted_on"]["name"])
    return CalibratedModel(model, LogitCalibration(cal["temperature"], cal["bias"]))


def place_model(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model


def build_loss_fn(cfg: DictConfig, class_weights, device: torch.device) -> CompositeLoss:
    ds = cfg.dataset
    return build_loss(cfg.loss, class_weights, num_classes=ds.num_classes, ignore_index=ds.ignore_index,
                      multilabel=is_multilabel(ds)).to(device)


def build_parts(cfg: DictConfig, model: torch.nn.Module, rt: Runtime, total_steps: int) -> TrainParts:
    """Optimizer (weight decay on conv/linear weights only), per-step LR schedule, GradScaler (fp16 only), EMA."""
    optimizer = instantiate(cfg.optimizer)(param_groups(model, cfg.optimizer.get("weight_decay", 0.0)))
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=total_steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    ema = cfg.trainer.ema
    return TrainParts(model, optimizer, scheduler, scaler, ema=None if ema.decay is None else
                      WeightEma(model, ema.decay, ema.warmup))
