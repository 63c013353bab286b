"""The run: build its objects, resume, ``engine.fit``, report.

Under torchrun (``segtrain.distributed``) every rank calls ``train``; rank 0's run directory is
the run's, and only rank 0 writes into it (config, logs, TensorBoard, checkpoints, metrics.json).
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from segtrain import distributed
from segtrain.analysis.hard_cases import write_report
from segtrain.atomic import NoSpaceLeft
from segtrain.build import (
    build_data,
    build_loaders,
    build_loss_fn,
    build_model,
    build_parts,
    build_runtime,
    place_model,
    resolve_num_workers,
    seed_everything,
    weights_column_options,
)
from segtrain.checkpoint import RunOutput, TrainState, resolve_resume, restore_training
from segtrain.config.checks import analysis_options, check_monitor, class_names_of, inference_options
from segtrain.data.class_weights import compute_class_weights, weights_table
from segtrain.errors import check_count
from segtrain.inference import check_tile
from segtrain.training.dashboard import TensorBoardLogger
from segtrain.training.early_stopping import EarlyStopping, check_early_stopping
from segtrain.training.ema import check_decay
from segtrain.training.engine import FitOptions, fit
from segtrain.training.nonfinite import check_nonfinite_policy
from segtrain.training.optim import RunLength, run_length
from segtrain.training.run_lock import run_lock
from segtrain.training.signals import STOPPED_EXIT_CODE, RunStopped, StopSignals
from segtrain.training.summary import gather_digests, hparams_metrics, hparams_of, write_metrics_json

log = logging.getLogger(__name__)


def _fit_options(cfg: DictConfig, analysis: DictConfig, class_names: list[str], steps_per_epoch: int,
                 length: RunLength, rt, stop: StopSignals) -> FitOptions:
    tr = cfg.trainer
    # Validation predicts as configured in inference.*, in the training run's precision.
    inference = inference_options(cfg, rt.device, amp_dtype=rt.amp_dtype)
    return FitOptions(
        epochs=length.epochs, steps_per_epoch=steps_per_epoch, batch_size=tr.batch_size, class_names=class_names,
        ignore_index=cfg.dataset.ignore_index, grad_accum=tr.grad_accum, grad_clip=tr.grad_clip,
        log_every=tr.log_every, eval_every=tr.eval_every,
        max_steps=length.stop_at, monitor=tr.monitor,
        monitor_mode=tr.monitor_mode, progress=tr.progress, num_samples=tr.num_samples, inference=inference,
        checkpoint_every=tr.checkpoint_every, stop=stop, on_nonfinite=tr.on_nonfinite, max_skipped=tr.max_skipped,
        rollback_lr_factor=tr.rollback_lr_factor, max_rollbacks=tr.max_rollbacks,
        ema_evaluate=tr.ema.evaluate, calibration_bins=analysis.calibration.bins,
        tensorboard_k=analysis.report.tensorboard_k,
        early_stopping=None if tr.early_stopping.patience is None else EarlyStopping(
            tr.early_stopping.patience, tr.early_stopping.min_delta, str(tr.monitor_mode), tr.monitor))


def _log_start(run_dir: Path, rt, data, steps_per_epoch: int, length: RunLength, tr: DictConfig) -> None:
    log.info("run directory: %s", run_dir.resolve())
    until = f", stopping at step {length.stop_at} (trainer.max_steps)" if length.stop_at < length.total_steps else ""
    log.info("device %s, amp %s, %d train / %d val images; %d optimizer steps in total = %d per epoch x %s epochs%s",
             rt.device, rt.amp_dtype or "none", len(data.train_set), len(data.val_set), length.total_steps,
             steps_per_epoch, f"{length.total_steps / steps_per_epoch:g}", until)
    if length.stop_at < tr.min_steps_warning:
        log.warning("%d optimizer steps in total: too few for most real datasets; set trainer.steps or trainer.epochs "
                    "(this warning: trainer.min_steps_warning=%d)", length.stop_at, tr.min_steps_warning)
    ranks = distributed.world_size()
    log.info("global batch %d = %d per rank x %d rank%s x %d accumulation step%s", tr.batch_size * ranks * tr.grad_accum,
             tr.batch_size, ranks, "s" if ranks > 1 else "", tr.grad_accum, "s" if tr.grad_accum > 1 else "")
    log.info("open the dashboards with: tensorboard --logdir %s", run_dir.resolve())
    every = f"every {tr.checkpoint_every} steps and " if tr.checkpoint_every else ""
    kept = f", the {tr.keep_last - 1} before it as step_<n>.pt" if tr.keep_last > 1 else ""
    log.info("checkpoints in %s: last.pt %safter each epoch%s; best.pt at the best %s", run_dir.resolve() / "checkpoints",
             every, kept, tr.monitor)
    policy = {"stop": "stop the run", "skip": f"skip the step (at most {tr.max_skipped} in a row)",
              "rollback": f"back to the last checkpoint, LR x {tr.rollback_lr_factor} (at most {tr.max_rollbacks} times)"}
    log.info("a non-finite training loss will %s (trainer.on_nonfinite=%s); SIGTERM, SIGUSR2 and Ctrl-C write last.pt "
             "after the step in progress and exit with status %d", policy[str(tr.on_nonfinite)], tr.on_nonfinite,
             STOPPED_EXIT_CODE)


def check_checkpoint_policy(tr: DictConfig) -> None:
    """trainer.checkpoint_every (null or a step count >= 1) and trainer.keep_last (>= 1), before anything runs."""
    if tr.checkpoint_every is not None:
        check_count("trainer.checkpoint_every", tr.checkpoint_every, "null or a number of optimizer steps")
    check_count("trainer.keep_last", tr.keep_last, "a number of checkpoints")


def check_sizes(tr: DictConfig, ds: DictConfig) -> None:
    """Batch sizes and step counts are whole numbers >= 1 (num_samples >= 0): composition checks only their type."""
    for key, expected in (("batch_size", "a number of images"), ("grad_accum", "a number of micro-batches"),
                          ("log_every", "a number of optimizer steps"), ("eval_every", "a number of epochs")):
        check_count(f"trainer.{key}", tr[key], expected)
    check_count("trainer.num_samples", tr.num_samples, "a number of images", minimum=0)
    check_count("dataset.batch_size_val", ds.batch_size_val, "a number of images")


def check_config(cfg: DictConfig) -> DictConfig:
    """What composition (segtrain/config/schema.py) cannot check, before anything is written: trainer.epochs or
    trainer.steps, number ranges of the checkpoint and non-finite policies, the loss terms' names and options, the
    analysis options (``build.analysis_options``, returned)."""
    check_sizes(cfg.trainer, cfg.dataset)
    check_checkpoint_policy(cfg.trainer)
    check_nonfinite_policy(cfg.trainer)
    check_early_stopping(cfg.trainer.early_stopping)
    if cfg.trainer.ema.decay is not None:
        check_decay(cfg.trainer.ema.decay)
    run_length(cfg.trainer.epochs, cfg.trainer.steps, cfg.trainer.max_steps, steps_per_epoch=1)
    build_loss_fn(cfg, None, torch.device("cpu"))
    return analysis_options(cfg)


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> float:
    """Train as ``cfg`` says, writing everything under ``run_dir``; returns the best monitored score.

    ``overrides`` (the command line's) are stored in the checkpoints, so that
    ``python -m segtrain.evaluate`` can apply further overrides on top of the same composition.
    """
    analysis = check_config(cfg)  # report, calibration, decision, checked
    distributed.init_from_env()
    distributed.quiet_other_ranks()
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    with run_lock(run_dir, enabled=distributed.is_main_process()):  # RunDirLocked: another training writes there
        try:
            return _train(cfg, run_dir, overrides, analysis)
        except OSError as err:  # a full disk met by a writer of TensorBoard's or the loaders' own: named as ours are
            if isinstance(err, NoSpaceLeft) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise NoSpaceLeft(Path(err.filename).parent if err.filename else run_dir, None) from err


def _train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, analysis: DictConfig) -> float:
    main_process = distributed.is_main_process()
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tr, ds = cfg.trainer, cfg.dataset
    seed_everything(cfg.seed, tr.deterministic)
    rt = build_runtime(tr)
    class_names = class_names_of(ds)
    check_monitor(tr.monitor, tr.monitor_mode, class_names, with_ece=analysis.calibration.bins is not None)

    data = build_data(ds, resolve_num_workers(tr.num_workers, rt.device))
    class_weights = compute_class_weights(data.stats, class_names=class_names, **cfg.weights)
    table = weights_table(data.stats, class_names, cfg.weights.strategy, weights=class_weights,
                          column_options=weights_column_options())
    log.info("class statistics of %s/%s (%d images):\n%s", data.train_set.root, data.train_set.split,
             data.stats.num_images, table)
    train_loader, val_loader, steps_per_epoch = build_loaders(data, cfg, rt.device)
    model = place_model(build_model(cfg.model), rt)
    loss_fn = build_loss_fn(cfg, class_weights, rt.device)
    length = run_length(tr.epochs, tr.steps, tr.max_steps, steps_per_epoch)
    parts = build_parts(cfg, model, rt, total_steps=length.total_steps)
    stop = StopSignals()  # installed once training starts
    opts = _fit_options(cfg, analysis, class_names, steps_per_epoch, length, rt, stop)
    check_tile(opts.inference, model)  # known once the model is: before step 1

    state = TrainState()
    candidates = resolve_resume(tr.resume, run_dir)
    last_step = None  # the step of this run directory's last.pt, when it is the checkpoint resumed from
    if candidates:
        state, resumed_from = restore_training(candidates, parts, class_weights)
        last_step = state.step if resumed_from == run_dir / "checkpoints" / "last.pt" else None
        if state.early_stop:
            log.info("the run stopped early at step %d (%s): evaluating, not training further", state.step,
                     state.early_stop)
    # DDP after the restore (it broadcasts rank 0's weights), torch.compile around the whole.
    parts.net = distributed.wrap_model(model, rt.device, cfg.model.get("sync_bn", "auto"))
    if tr.compile:
        parts.net = torch.compile(parts.net)

    stop.install()  # SIGTERM, SIGUSR2, Ctrl-C: last.pt at the next step, then RunStopped
    _log_start(run_dir, rt, data, steps_per_epoch, length, tr)
    logger = TensorBoardLogger(run_dir / "tensorboard", class_names, ds.ignore_index, ds.mean, ds.std) \
        if main_process else None
    if logger is not None:
        logger.text("data/class_weights", table)
    meta = {"config": OmegaConf.to_yaml(cfg, resolve=True), "overrides": list(overrides or []),
            "class_names": class_names, "class_weights": class_weights.cpu()}
    out = RunOutput(run_dir / "checkpoints" if main_process else None, logger, meta, tr.keep_last, last_step)
    start = time.perf_counter()
    try:
        final = fit(parts, train_loader, val_loader, loss_fn, rt, state, opts, out)
        if logger is not None:
            logger.hparams(hparams_of(cfg, rt.amp_dtype), hparams_metrics(final, state.best_metrics))
            logger.text("data/class_statistics", table, state.step)
    except RunStopped as stopped:
        log.warning("%s", stopped)
        raise
    finally:
        stop.restore()
        if logger is not None:
            logger.close()
    digests = gather_digests(model)
    if main_process:
        write_report(run_dir / "eval" / ds.val_split, parts.eval_model(tr.ema.evaluate), val_loader.dataset,
                     getattr(out.last_evaluation, "per_image", None), class_names, analysis.report.worst_k, rt,
                     opts.inference, ds.mean, ds.std, ds.ignore_index)
        write_metrics_json(run_dir / "metrics.json", cfg, class_names, data.stats, class_weights, final, state,
                           time.perf_counter() - start, digests)
        log.info("final %s = %.4f, best %.4f at step %s; metrics in %s", tr.monitor, final[tr.monitor],
                 state.best_score, state.best_metrics.get("step"), run_dir / "metrics.json")
        log.info("dashboards: tensorboard --logdir %s", run_dir.resolve())
    return state.best_score
