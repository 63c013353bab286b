"""Config values checked against each other and against a checkpoint, before anything runs or is written: the
class names against the class count, the monitored metric against what an evaluation logs, a checkpoint's
model outputs against the dataset it is given."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from segtrain.checkpoint import SavedModel
from segtrain.config.compose import CONFIG_DIR
from segtrain.errors import check_choice, check_count, choice_message
from segtrain.inference import InferenceOptions
from segtrain.metrics import ConfusionMatrix, flatten_metrics
from segtrain.runtime import resolve_amp


def class_names_of(ds: DictConfig) -> list[str]:
    names = ds.get("class_names") or [f"class_{i}" for i in range(ds.num_classes)]
    if len(names) != ds.num_classes:
        raise ValueError(f"dataset.class_names has {len(names)} names but dataset.num_classes={ds.num_classes}")
    return list(names)


def check_monitor(monitor: str, mode: str, class_names: list[str], with_ece: bool = True) -> None:
    """Fail before training, not at the first evaluation, on a misspelt metric name."""
    # The names an evaluation will produce: those of an empty confusion matrix, plus the loss (and calibration).
    valid = set(flatten_metrics(ConfusionMatrix(len(class_names)).compute(), class_names, "val")) | {"val/loss"}
    valid |= {"val/ece", *(f"val/ece/{name}" for name in class_names)} if with_ece else set()
    if monitor not in valid:
        raise KeyError(choice_message("trainer.monitor", monitor, sorted(valid), "is not a logged metric"))
    check_choice("trainer.monitor_mode", mode, ("max", "min"))


def check_class_count(saved: SavedModel, cfg: DictConfig) -> None:
    """The model's output channels (its ``model.num_classes``), ``dataset.num_classes`` and the class names must
    agree: a checkpoint of 3 classes scored or exported with 4 or 5 names is stopped here, before any pass."""
    outputs = cfg.model.get("num_classes")
    if outputs is not None and outputs != cfg.dataset.num_classes:
        raise ValueError(f"{saved.path}: the model has {outputs} output channel{'s' if outputs != 1 else ''} "
                         f"(trained on {', '.join(saved.class_names)}) but dataset.num_classes="
                         f"{cfg.dataset.num_classes}; give a dataset of the model's classes")
    try:
        class_names_of(cfg.dataset)
    except ValueError as err:
        raise ValueError(f"{saved.path}: {err}") from None


def inference_options(cfg: DictConfig, device: torch.device, amp_dtype: torch.dtype | None | str = "config"
                      ) -> InferenceOptions:
    """``cfg.inference`` (defaults where a checkpoint's older config lacks a key) for ``device``;
    ``amp_dtype`` other than ``"config"`` replaces ``inference.amp`` (a run's own precision)."""
    inf = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "inference" / "default.yaml"), cfg.get("inference") or {})
    ds = cfg.dataset
    tile = inf.tile if inf.tile is not None else (ds.get("augment") or {}).get("crop_size") or 512
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    allowed = ds.get("tta_flips")
    if allowed is None:  # configs from before dataset.tta_flips: the flips training augmented with
        allowed = [f for f, key in (("h", "hflip"), ("v", "vflip")) if (ds.get("augment") or {}).get(key)]
    for flip in inf.tta.flips:
        if flip not in allowed:
            raise ValueError(choice_message("inference.tta.flips", list(inf.tta.flips), allowed,
                                            f"has {flip!r}, which dataset.tta_flips does not allow"))
    if amp_dtype == "config":
        amp = (cfg.trainer.amp if device.type == "cuda" else "none") if inf.amp == "checkpoint" else inf.amp
        amp_dtype = resolve_amp(amp, device)
    return InferenceOptions(inf.mode, tile, float(inf.overlap), inf.blend, int(inf.batch_size),
                            tuple(inf.tta.flips), tuple(float(s) for s in inf.tta.scales), amp_dtype,
                            float(inf.threshold))


def analysis_options(cfg: DictConfig) -> DictConfig:
    """``report``, ``calibration`` and ``decision`` of ``cfg`` over configs/analysis/default.yaml (a checkpoint's
    older config lacks them), checked: whole numbers where counts are expected."""
    defaults = OmegaConf.load(CONFIG_DIR / "analysis" / "default.yaml")
    options = OmegaConf.merge(defaults, {key: cfg.get(key) or {} for key in defaults})
    for key in ("worst_k", "tensorboard_k"):
        check_count(f"report.{key}", options.report[key], "a number of images per class", minimum=0)
    if options.calibration.bins is not None:
        check_count("calibration.bins", options.calibration.bins, "null or a number of bins")
    check_count("calibration.max_pixels", options.calibration.max_pixels, "a number of pixels")
    return options
