"""The config tree read into checked plain values, once, before anything is written.

``check_config(cfg)`` is the one place that checks what composition (``schema``) cannot: number ranges,
cross-key rules (monitor against the class names, tiles, the TTA flips a dataset allows), the loss terms, the
run length, the policies; it returns ``RunOptions``, the plain values a training run needs. ``python -m segtrain``
calls it from Hydra's ``on_run_start`` (``segtrain.train.RunStart``), before the run directory exists, so a bad
value leaves nothing behind; ``train()`` calls it when no Hydra app did.

    options = check_config(cfg)               # ValueError / KeyError naming the key and what was expected
    length, fit = options.fit_for(steps_per_epoch=60, stop=StopSignals())

``inference_options`` and ``analysis_options`` are the same reading for evaluate, predict, calibrate and export.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from segtrain import distributed
from segtrain.config.checks import check_monitor, check_multilabel_dataset, class_names_of, is_multilabel
from segtrain.config.schema import DatasetConfig
from segtrain.errors import check_choice, check_count, choice_message
from segtrain.inference import InferenceOptions
from segtrain.losses import build_loss
from segtrain.models.timm_encoder import check_timm_name, is_timm, pretrained_normalisation
from segtrain.runtime import Runtime, resolve_amp
from segtrain.tracking import check_tracking
from segtrain.training.early_stopping import EarlyStopping, check_early_stopping
from segtrain.training.ema import check_decay
from segtrain.training.engine import FitOptions
from segtrain.training.nonfinite import check_nonfinite_policy
from segtrain.training.optim import RunLength, run_length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportOptions:
    dir: str | None  # the per-image report's folder; None: beside the checkpoint's run
    worst_k: int
    tensorboard_k: int
    galleries: bool = True  # the report's gallery images; False: per_image.csv and report.md only


@dataclass(frozen=True)
class CalibrationOptions:
    bins: int | None  # None: calibration not measured
    max_pixels: int
    seed: int


@dataclass(frozen=True)
class DecisionOptions:
    tune: bool
    objective: str
    max_drop: float | None = 0.02  # the most of its own score any class may lose to the bias; None: no guard


@dataclass(frozen=True)
class PostprocessOptions:
    """``postprocess.*``: tuning per-class component rules (segtrain.calibrate) and applying them."""

    tune: bool = False
    enabled: bool = True
    connectivity: int = 8
    objective: str = "dice"
    tolerance: float = 0.005
    min_gain: float = 0.001
    classes: tuple[str, ...] | None = None
    min_size_grid: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    max_hole_grid: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    keep_largest: bool = True


@dataclass(frozen=True)
class AnalysisOptions:
    """``report``, ``calibration``, ``decision`` (configs/analysis/default.yaml)."""

    report: ReportOptions
    calibration: CalibrationOptions
    decision: DecisionOptions
    postprocess: PostprocessOptions


def analysis_options(cfg: DictConfig) -> AnalysisOptions:
    """``report``, ``calibration`` and ``decision``, checked: whole numbers where counts are expected."""
    report, calibration, decision = cfg.report, cfg.calibration, cfg.decision
    for key in ("worst_k", "tensorboard_k"):
        check_count(f"report.{key}", report[key], "a number of images per class", minimum=0)
    if calibration.bins is not None:
        check_count("calibration.bins", calibration.bins, "null or a number of bins")
    check_count("calibration.max_pixels", calibration.max_pixels, "a number of pixels")
    galleries = report.get("galleries", True)  # absent from a checkpoint's older config: drawn, as then
    if not isinstance(galleries, bool):
        raise ValueError(f"report.galleries={galleries!r}: expected true or false")
    return AnalysisOptions(ReportOptions(report.dir, report.worst_k, report.tensorboard_k, galleries),
                           CalibrationOptions(calibration.bins, calibration.max_pixels, calibration.seed),
                           DecisionOptions(bool(decision.tune), str(decision.objective), _max_drop(decision)),
                           postprocess_options(cfg.get("postprocess")))


def _max_drop(decision: DictConfig) -> float | None:
    value = decision.get("max_drop", 0.02)  # absent from a checkpoint's older config: the default guard
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise ValueError(f"decision.max_drop={value!r}: expected null or a score difference in [0, 1]")
    return None if value is None else float(value)


def postprocess_options(pp: DictConfig | None) -> PostprocessOptions:
    """``postprocess.*`` checked (absent from a checkpoint's older config: the defaults)."""
    if pp is None:
        return PostprocessOptions()
    check_choice("postprocess.connectivity", pp.connectivity, (4, 8))
    check_choice("postprocess.objective", pp.objective, ("dice", "iou"))
    for key in ("tolerance", "min_gain"):
        if not isinstance(pp.get(key, 0.0), (int, float)) or pp.get(key, 0.0) < 0:
            raise ValueError(f"postprocess.{key}={pp[key]!r}: expected a score difference >= 0")
    for key in ("min_size_grid", "max_hole_grid"):
        for value in pp[key]:
            check_count(f"postprocess.{key}", value, "a list of pixel counts")
    classes = None if pp.classes is None else tuple(str(c) for c in pp.classes)
    return PostprocessOptions(bool(pp.tune), bool(pp.enabled), int(pp.connectivity), str(pp.objective),
                              float(pp.tolerance), float(pp.get("min_gain", 0.0)), classes, tuple(pp.min_size_grid),
                              tuple(pp.max_hole_grid), bool(pp.keep_largest))


def inference_options(cfg: DictConfig, device: torch.device, amp_dtype: torch.dtype | None | str = "config"
                      ) -> InferenceOptions:
    """``cfg.inference`` for ``device``; ``amp_dtype`` other than ``"config"`` replaces ``inference.amp`` (a run's
    own precision). ``inference.amp=checkpoint``: the run's trainer.amp on CUDA, float32 on a CPU."""
    inf, ds = cfg.inference, cfg.dataset
    tile = inf.tile if inf.tile is not None else ds.augment.crop_size or 512
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    for flip in inf.tta.flips:
        if flip not in ds.tta_flips:
            raise ValueError(choice_message("inference.tta.flips", list(inf.tta.flips), list(ds.tta_flips),
                                            f"has {flip!r}, which dataset.tta_flips does not allow"))
    if amp_dtype == "config":
        amp = (cfg.trainer.amp if device.type == "cuda" else "none") if inf.amp == "checkpoint" else inf.amp
        amp_dtype = resolve_amp(amp, device)
    return InferenceOptions(inf.mode, tile, float(inf.overlap), inf.blend, int(inf.batch_size),
                            tuple(inf.tta.flips), tuple(float(s) for s in inf.tta.scales), amp_dtype,
                            multilabel=is_multilabel(ds))


def build_runtime(tr: DictConfig) -> Runtime:
    """Device (``auto``: CUDA when present; under DDP the local rank's GPU), precision, memory layout."""
    device = distributed.device_for(tr.device)
    return Runtime(device, resolve_amp(tr.amp, device), tr.channels_last)


def _check_trainer(tr: DictConfig, ds: DictConfig) -> None:
    """Whole numbers >= 1 where composition checks only the type, and the policies' numbers."""
    for key, expected in (("batch_size", "a number of images"), ("grad_accum", "a number of micro-batches"),
                          ("log_every", "a number of optimizer steps"), ("eval_every", "a number of epochs"),
                          ("keep_last", "a number of checkpoints")):
        check_count(f"trainer.{key}", tr[key], expected)
    check_count("trainer.num_samples", tr.num_samples, "a number of images", minimum=0)
    check_count("dataset.batch_size_val", ds.batch_size_val, "a number of images")
    if tr.checkpoint_every is not None:
        check_count("trainer.checkpoint_every", tr.checkpoint_every, "null or a number of optimizer steps")
    check_nonfinite_policy(tr.on_nonfinite, tr.max_skipped, tr.rollback_lr_factor, tr.max_rollbacks)
    check_early_stopping(tr.early_stopping.patience, tr.early_stopping.min_delta)
    if tr.ema.decay is not None:
        check_decay(tr.ema.decay)
    run_length(tr.epochs, tr.steps, tr.max_steps, steps_per_epoch=1)
    if tr.resume and tr.resume != "auto" and not Path(tr.resume).expanduser().is_file():
        raise FileNotFoundError(f"trainer.resume={tr.resume!r}: no such checkpoint file")


@dataclass(frozen=True)
class RunOptions:
    """What a training run needs of its config, checked. ``fit`` lacks the run length until the data are known."""

    class_names: list[str]
    runtime: Runtime
    analysis: AnalysisOptions
    fit: FitOptions
    epochs: int | None
    steps: int | None
    max_steps: int | None

    def fit_for(self, steps_per_epoch: int, stop=None) -> tuple[RunLength, FitOptions]:
        """The run length of ``steps_per_epoch`` and the FitOptions with it (and the run's stop signals)."""
        length = run_length(self.epochs, self.steps, self.max_steps, steps_per_epoch)
        return length, dataclasses.replace(self.fit, epochs=length.epochs, steps_per_epoch=steps_per_epoch,
                                           max_steps=length.stop_at, stop=stop)


def check_config(cfg: DictConfig) -> RunOptions:
    """Every check composition cannot make, before anything is written; the plain values of the run."""
    tr, ds = cfg.trainer, cfg.dataset
    multilabel = is_multilabel(ds)
    if multilabel:
        check_multilabel_dataset(ds)
    else:
        check_count("dataset.num_classes", ds.num_classes, "a number of classes (binary data: 2, background and "
                    "foreground)", minimum=2)
    _check_trainer(tr, ds)
    if is_timm(cfg.model.get("encoder")):
        check_timm_name(cfg.model.encoder)  # timm installed, the name known: before the data pass
    class_names = class_names_of(ds)
    analysis = analysis_options(cfg)
    check_monitor(tr.monitor, tr.monitor_mode, class_names, with_ece=analysis.calibration.bins is not None)
    # the terms' names and options
    build_loss(cfg.loss, None, num_classes=ds.num_classes, ignore_index=ds.ignore_index, multilabel=multilabel)
    check_tracking(cfg)  # the extra installed, a server answering: before the data pass
    runtime = build_runtime(tr)
    # Validation predicts as configured in inference.*, in the training run's precision.
    inference = inference_options(cfg, runtime.device, amp_dtype=runtime.amp_dtype)
    early = tr.early_stopping
    fit = FitOptions(
        epochs=0, steps_per_epoch=0, batch_size=tr.batch_size, class_names=class_names, ignore_index=ds.ignore_index,
        grad_accum=tr.grad_accum, grad_clip=tr.grad_clip, log_every=tr.log_every, eval_every=tr.eval_every,
        monitor=tr.monitor, monitor_mode=str(tr.monitor_mode), progress=tr.progress, num_samples=tr.num_samples,
        inference=inference, checkpoint_every=tr.checkpoint_every, on_nonfinite=str(tr.on_nonfinite),
        max_skipped=tr.max_skipped, rollback_lr_factor=tr.rollback_lr_factor, max_rollbacks=tr.max_rollbacks,
        ema_evaluate=tr.ema.evaluate, calibration_bins=analysis.calibration.bins,
        tensorboard_k=analysis.report.tensorboard_k, multilabel=multilabel,
        report_k=analysis.report.worst_k if analysis.report.galleries else 0,
        early_stopping=None if early.patience is None else EarlyStopping(early.patience, early.min_delta,
                                                                         str(tr.monitor_mode), tr.monitor))
    return RunOptions(class_names, runtime, analysis, fit, tr.epochs, tr.steps, tr.max_steps)


def adopt_encoder_normalisation(cfg: DictConfig) -> None:
    """A pretrained timm encoder expects its own input normalisation (timm's ``pretrained_cfg`` mean/std). With
    ``dataset.mean``/``std`` at segtrain's defaults (ImageNet's), the run takes timm's, written into its config (so
    evaluate, predict and export use them too); set to anything else, they are kept, with a warning."""
    model, ds = cfg.model, cfg.dataset
    if not is_timm(model.get("encoder")) or model.get("encoder_weights") is None:
        return
    expected = pretrained_normalisation(model.encoder)
    if expected is None or _close((ds.mean, ds.std), expected):
        return
    default = DatasetConfig()
    if _close((ds.mean, ds.std), (default.mean, default.std)):
        log.info("dataset.mean/std: %s and %s, what %s's pretrained weights expect (timm's pretrained_cfg), instead "
                 "of the ImageNet defaults", *expected, model.encoder)
        ds.mean, ds.std = expected
    else:
        log.warning("dataset.mean=%s, dataset.std=%s kept as set, though %s's pretrained weights expect %s and %s",
                    list(ds.mean), list(ds.std), model.encoder, *expected)


def _close(a, b) -> bool:
    return all(len(x) == len(y) and all(abs(float(u) - float(v)) < 1e-6 for u, v in zip(x, y)) for x, y in zip(a, b))
