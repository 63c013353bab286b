"""Config values checked against each other and against a checkpoint, before anything runs or is written: the
class names against the class count, the monitored metric against what an evaluation logs, a checkpoint's
model outputs against the dataset it is given."""

from __future__ import annotations

from omegaconf import DictConfig

from segtrain.checkpoint import SavedModel
from segtrain.errors import check_choice, choice_message
from segtrain.metrics import ConfusionMatrix, flatten_metrics
from segtrain.training.early_stopping import MONITOR_MODES


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
    check_choice("trainer.monitor_mode", mode, MONITOR_MODES)


def check_class_count(saved: SavedModel, cfg: DictConfig) -> None:
    """The model's output channels (its ``model.num_classes``), ``dataset.num_classes`` and the class names must
    agree: a checkpoint of 3 classes scored or exported with 4 or 5 names is stopped here, before any pass."""
    outputs = cfg.model.get("num_classes")
    if outputs is not None and outputs < 2:
        raise ValueError(f"{saved.path}: a model of {outputs} output channel (an earlier segtrain's one-channel "
                         "sigmoid model): segmentation models here have two classes or more; train the binary task "
                         "with dataset.num_classes=2 (background and foreground)")
    if outputs is not None and outputs != cfg.dataset.num_classes:
        raise ValueError(f"{saved.path}: the model has {outputs} output channels "
                         f"(trained on {', '.join(saved.class_names)}) but dataset.num_classes="
                         f"{cfg.dataset.num_classes}; give a dataset of the model's classes")
    try:
        class_names_of(cfg.dataset)
    except ValueError as err:
        raise ValueError(f"{saved.path}: {err}") from None
