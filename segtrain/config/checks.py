"""Config values checked against each other and against a checkpoint, before anything runs or is written: the
class names against the class count, the monitored metric against what an evaluation logs, a checkpoint's
model outputs against the dataset it is given."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from segtrain.checkpoint import SavedModel
from segtrain.data.multilabel import check_channels, parse_regions
from segtrain.errors import check_choice, check_count, choice_message
from segtrain.metrics import ConfusionMatrix, flatten_metrics
from segtrain.training.early_stopping import MONITOR_MODES


def is_multilabel(ds: DictConfig) -> bool:
    """Whether the dataset's targets are channels that may overlap, one sigmoid each (``segtrain.data.multilabel``):
    regions of a label map, or per-class binary masks."""
    return ds.get("regions") is not None or ds.get("layout") == "binary_masks"


def check_multilabel_dataset(ds: DictConfig) -> None:
    """A multi-label dataset's keys against each other, before the data are read: a channel count for the code
    (``segtrain.data.multilabel.MAX_CHANNELS``), one channel per region, names for the binary mask files."""
    check_count("dataset.num_classes", ds.num_classes, "a number of channels (one sigmoid each)", minimum=1)
    check_channels(ds.num_classes)
    regions = ds.get("regions")
    if regions is not None:
        if ds.layout == "binary_masks":
            raise ValueError("dataset.regions and dataset.layout=binary_masks both set: regions are made from a label "
                             "map; binary masks already give one file per channel")
        names, _ = parse_regions(OmegaConf.to_container(regions) if OmegaConf.is_config(regions) else regions,
                                 ds.ignore_index)
        if len(names) != ds.num_classes:
            raise ValueError(f"dataset.regions has {len(names)} regions ({', '.join(names)}) but dataset.num_classes="
                             f"{ds.num_classes}: a multi-label model has one output channel per region")
    elif not ds.get("class_names"):
        raise ValueError("dataset.layout=binary_masks needs dataset.class_names, one per channel: the mask files are "
                         "masks/<split>/<stem>/<class_name>.png")
    if ds.sampling.cat_max_ratio is not None:
        raise ValueError("dataset.sampling.cat_max_ratio limits one class's share of a crop of a label map; "
                         "multi-label channels overlap and have no such share: leave it null (rare_crop_p and "
                         "repeat_thresh work per channel)")


def class_names_of(ds: DictConfig) -> list[str]:
    regions = ds.get("regions")
    default = list(regions) if regions is not None else [f"class_{i}" for i in range(ds.num_classes)]
    names = ds.get("class_names") or default
    if regions is not None and list(names) != default:
        raise ValueError(f"dataset.class_names {list(names)} differ from the names of dataset.regions {default}: "
                         "with regions the channels are named by their regions; leave dataset.class_names null")
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
    if outputs is not None and outputs < 2 and not is_multilabel(cfg.dataset):
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
