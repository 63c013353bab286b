"""Types of the config groups: dataclasses registered in Hydra's ConfigStore as ``schema/<group>/<name>``.

Each YAML file under configs/ names its schema first in its defaults list
(``- /schema/trainer/trainer@_here_``), so that composition itself checks every value: a wrong type
(``trainer.batch_size=eight``), a value outside its choices (``trainer.amp=fp17``) or a misspelt key
(``trainer.epocs=3``) stops before the run directory exists, with OmegaConf's message naming the
full key. Loss terms are the exception (see ``LossConfig``). The YAML files keep the defaults users read and their comments; the defaults here only
fill keys a YAML file leaves out. Choices are ``Choice`` enums, which compare and print as their
strings, so code reading the config sees ``"bf16"`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """One of fixed strings: equal to its value, printed as its value."""

    __str__ = str.__str__
    __format__ = str.__format__


Amp = Choice("Amp", {n: n for n in ("auto", "bf16", "fp16", "none")})
MonitorMode = Choice("MonitorMode", {n: n for n in ("max", "min")})
OnNonfinite = Choice("OnNonfinite", {n: n for n in ("stop", "skip", "rollback")})
OnBadLabel = Choice("OnBadLabel", {n: n for n in ("error", "ignore")})
Layout = Choice("Layout", {n: n for n in ("folder", "voc", "cityscapes", "binary_masks", "shards", "rasters")})
MissingMask = Choice("MissingMask", {n: n for n in ("negative", "ignore")})
Strategy = Choice("Strategy", {n: n for n in ("none", "inverse_freq", "sqrt_inv_freq", "median_freq", "enet",
                                              "effective_num", "manual")})
Normalize = Choice("Normalize", {n: n for n in ("none", "mean")})
Absent = Choice("Absent", {n: n for n in ("zero", "error")})
CountOf = Choice("CountOf", {n: n for n in ("images", "pixels")})
Schedule = Choice("Schedule", {n: n for n in ("poly", "cosine", "none")})


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None
    min_delta: float = 0.0


@dataclass
class EmaConfig:
    decay: Optional[float] = None
    evaluate: bool = True
    warmup: bool = True


@dataclass
class TrainerConfig:
    device: str = "auto"
    amp: Amp = Amp.auto
    channels_last: bool = False
    compile: bool = False
    epochs: Optional[int] = None
    steps: Optional[int] = None
    min_steps_warning: int = 500
    batch_size: int = MISSING
    num_workers: Any = "auto"  # auto or a count
    pin_memory: Any = "auto"  # auto, true or false
    grad_clip: Optional[float] = None
    grad_accum: int = 1
    deterministic: bool = False
    log_every: int = 10
    eval_every: int = 1
    monitor: str = "val/mDice"
    monitor_mode: MonitorMode = MonitorMode.max
    max_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    keep_last: int = 1
    on_nonfinite: OnNonfinite = OnNonfinite.stop
    max_skipped: int = 10
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    resume: Optional[str] = None
    progress: bool = True
    num_samples: int = 4


@dataclass
class AugmentConfig:
    hflip: bool = False
    vflip: bool = False
    scale_range: Optional[List[float]] = None
    crop_size: Any = None  # an int or [height, width]
    color_jitter: Optional[float] = None
    extra: List[Any] = field(default_factory=list)


@dataclass
class SamplingConfig:
    rare_crop_p: float = 0.0
    cat_max_ratio: Optional[float] = None
    repeat_thresh: Optional[float] = None


@dataclass
class GenerateConfig:
    num_train: int = 480
    num_val: int = 120
    size: int = 128
    seed: int = 0
    multilabel: bool = False  # per-class binary masks with an overlapping rare layer (segtrain.data.synthetic)


@dataclass
class DatasetConfig:
    name: str = MISSING
    layout: Layout = Layout.folder
    root: str = MISSING
    num_classes: int = MISSING
    class_names: Optional[List[str]] = None
    ignore_index: int = 255
    train_split: str = "train"
    val_split: str = "val"
    split: str = "val"
    list_file: Optional[str] = None
    cache_dir: Optional[str] = None  # the class-count cache's folder; null: <root>/.segtrain/ (data.scan_cache)
    label_mapping: Any = None  # {stored value: class}
    palette: Any = None  # [[r, g, b], ...] or {'r,g,b': class}
    on_unknown_color: Optional[OnBadLabel] = None
    on_bad_label: OnBadLabel = OnBadLabel.error
    regions: Any = None  # multi-label: {region name: [labels]} of the label map, one sigmoid channel each
    missing_mask: MissingMask = MissingMask.negative  # layout binary_masks: a class file that is not there
    tile_size: Any = None  # layout rasters: the tiles (an int or [height, width]) each raster pair is cut into
    tile_stride: Any = None  # layout rasters: pixels between tiles; null = tile_size (no overlap)
    urls: Any = None  # layout shards: {split: URL pattern} where its shards are read, instead of beside the index
    batch_size_val: int = 4
    val_resize: Any = None  # null, pad32 or a shorter-side length
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tta_flips: List[str] = field(default_factory=list)
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    generate: Optional[GenerateConfig] = None  # the synthetic datasets: written under root on first use


@dataclass
class ModelConfig:
    _target_: str = MISSING
    num_classes: int = MISSING
    in_channels: int = 3
    encoder: Optional[str] = None
    encoder_weights: Optional[str] = None
    freeze_bn: bool = False
    sync_bn: Any = "auto"  # auto, true or false


@dataclass
class UNetConfig(ModelConfig):
    _target_: str = "segtrain.models.UNet"
    decoder_channels: Optional[List[int]] = None
    base_width: int = 64


@dataclass
class DeepLabV3PlusConfig(ModelConfig):
    _target_: str = "segtrain.models.DeepLabV3Plus"
    output_stride: int = 16
    separable: bool = False


@dataclass
class LossConfig:
    # Term name -> its options. Typed loosely: OmegaConf cannot add a key to a dict of dataclasses from the
    # command line (+loss.terms.lovasz.loss_weight=0.5), and each term takes other options. build_loss checks
    # the names and options instead, before the run directory exists (train.check_config).
    terms: Dict[str, Any] = field(default_factory=dict)


@dataclass
class WeightsConfig:
    strategy: Strategy = MISSING
    normalize: Normalize = Normalize.none
    max_weight: Optional[float] = None
    absent: Absent = Absent.zero


@dataclass
class EffectiveNumWeightsConfig(WeightsConfig):
    beta: float = 0.9999
    count: CountOf = CountOf.images


@dataclass
class EnetWeightsConfig(WeightsConfig):
    k: float = 1.02


@dataclass
class ManualWeightsConfig(WeightsConfig):
    values: List[float] = MISSING


@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    _partial_: bool = True
    lr: float = MISSING
    weight_decay: float = 0.0


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class SchedulerConfig:
    _target_: str = "segtrain.training.optim.build_scheduler"
    _partial_: bool = True
    name: Schedule = Schedule.poly
    power: float = 0.9
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


Backend = Choice("Backend", {n: n for n in ("none", "mlflow")})


@dataclass
class TrackingConfig:
    backend: Backend = Backend.none
    uri: Optional[str] = None  # null: a local SQLite store under outputs/; http(s)://host:port: a server
    experiment: str = "segtrain"
    run_name: Optional[str] = None
    log_checkpoints: bool = False


SCHEMAS = {
    "trainer": {"trainer": TrainerConfig},
    "dataset": {"dataset": DatasetConfig},
    "model": {"unet": UNetConfig, "deeplabv3plus": DeepLabV3PlusConfig},
    "loss": {"loss": LossConfig},
    "weights": {"weights": WeightsConfig, "effective_num": EffectiveNumWeightsConfig, "enet": EnetWeightsConfig,
                "manual": ManualWeightsConfig},
    "optimizer": {"adamw": AdamWConfig, "sgd": SGDConfig},
    "scheduler": {"scheduler": SchedulerConfig},
    "tracking": {"tracking": TrackingConfig},
}


def register() -> None:
    """Put every schema in Hydra's ConfigStore (idempotent); done when segtrain.config is imported."""
    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)
