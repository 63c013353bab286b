"""The run: build its objects, resume, ``engine.fit``, report.

Under torchrun (``segtrain.distributed``) every rank calls ``train``; rank 0's run directory is
the run's, and only rank 0 writes into it (config, logs, TensorBoard, checkpoints, metrics.json).
``python -m segtrain`` checks the config (``config.options.check_config``) and takes the run directory's lock
in Hydra's ``on_run_start`` (``RunStart``), before Hydra makes the directory: a bad value or a second
training in the same directory leaves nothing behind.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segtrain import distributed
from segtrain.analysis.hard_cases import write_report
from segtrain.analysis.model_card import write_model_card
from segtrain.atomic import NoSpaceLeft
from segtrain.build import (build_data, build_loaders, build_loss_fn, build_model, build_parts, class_weights_of,
                            place_model, resolve_num_workers, seed_everything)
from segtrain.checkpoint import RunOutput, TrainState, resolve_resume, restore_training
from segtrain.config.options import RunOptions, adopt_encoder_normalisation, check_config
from segtrain.data.scan_cache import counts_cache_in
from segtrain.inference import check_tile
from segtrain.tracking import check_tracking, end_sweep, open_tracker
from segtrain.training.dashboard import TensorBoardLogger
from segtrain.training.engine import fit
from segtrain.training.optim import RunLength
from segtrain.training.run_lock import acquire, release, run_lock
from segtrain.training.signals import STOPPED_EXIT_CODE, RunStopped, StopSignals
from segtrain.training.summary import gather_digests, hparams_metrics, hparams_of, write_metrics_json

log = logging.getLogger(__name__)
_started: dict[str, RunOptions] = {}  # RunStart's checked options, for the run it started: run() takes them


class RunStart(Callback):
    """``hydra.callbacks.run_start``: the config checked and the run directory locked before Hydra writes anything
    into it (.hydra/, train.log). Hydra turns a callback's exceptions into warnings and runs on, so a refusal
    exits here, with status 1 and the message."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        try:
            options = check_config(config)  # every rank: each stops on its own
            run_dir = Path(str(config.hydra.run.dir))
            if distributed.is_main_process():
                acquire(run_dir)
                self.run_dir = run_dir
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # RunDirLocked is a RuntimeError
            raise SystemExit(f"error: {err}") from None
        _started["options"] = options

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        if self.run_dir is not None:
            release(self.run_dir)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """Before the sweeper starts: what would fail only once it had (an Optuna storage it cannot open)."""
        try:
            check_sweep_storage(config)
            check_tracking(config)  # once for the sweep: a bad tracking.uri stops it before the first job
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        end_sweep(config)  # the tracker's parent run of the sweep, finished


def check_sweep_storage(config: Any) -> None:
    """optuna 2.10 (the newest hydra-optuna-sweeper takes) opens an RDB storage only with SQLAlchemy < 2, and
    MLflow 3 (the mlflow extra) needs SQLAlchemy 2: with both extras in one environment the in-memory study works,
    a stored one (``hydra.sweeper.storage=sqlite:...``) is refused here, before any trial."""
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    if storage is None:
        return
    import sqlalchemy

    if int(sqlalchemy.__version__.split(".")[0]) >= 2:
        raise ValueError(f"hydra.sweeper.storage={storage}: optuna 2.10 (hydra-optuna-sweeper) cannot open a stored "
                         f"study with SQLAlchemy {sqlalchemy.__version__}, which MLflow 3 (the mlflow extra) needs; "
                         "leave the storage null (the study in memory), or keep stored studies in an environment "
                         "without the mlflow extra: pip install -e '.[sweep]' 'SQLAlchemy<2' (docs/sweeps.md)")


def started_options() -> RunOptions | None:
    """The options ``RunStart`` checked for this process's run, once."""
    return _started.pop("options", None)


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None,
          options: RunOptions | None = None) -> float:
    """Train as ``cfg`` says, writing everything under ``run_dir``; returns the best monitored score.

    ``overrides`` (the command line's) are stored in the checkpoints, so that
    ``python -m segtrain.evaluate`` can apply further overrides on top of the same composition. ``options``: the
    config as ``check_config`` checked it (``RunStart`` did); None: checked here, before anything is written.
    """
    distributed.init_from_env()
    options = options or check_config(cfg)
    adopt_encoder_normalisation(cfg)  # before the run's config is written
    distributed.quiet_other_ranks()
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    with run_lock(run_dir, enabled=distributed.is_main_process()):  # RunDirLocked: another training writes there
        try:
            return _train(cfg, run_dir, overrides, options)
        except OSError as err:  # a full disk met by a writer of TensorBoard's or the loaders' own: named as ours are
            if isinstance(err, NoSpaceLeft) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise NoSpaceLeft(Path(err.filename).parent if err.filename else run_dir, None) from err


def _train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, options: RunOptions) -> float:
    main_process = distributed.is_main_process()
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = open_tracker(cfg, run_dir, overrides)  # rank 0 with tracking=mlflow, else None
    status = "FAILED"
    try:
        best = _run(cfg, run_dir, overrides, options, tracker)
        status = "FINISHED"
        return best
    except RunStopped:
        status = "KILLED"  # resumed later into the same MLflow run
        raise
    finally:
        if tracker is not None:
            tracker.close(status)


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, options: RunOptions, tracker) -> float:
    main_process = distributed.is_main_process()
    tr, ds, rt, class_names = cfg.trainer, cfg.dataset, options.runtime, options.class_names
    seed_everything(cfg.seed, tr.deterministic)
    with counts_cache_in(ds.get("cache_dir")):  # the class-count cache's folder: build_data's pass takes no config
        data = build_data(ds, resolve_num_workers(tr.num_workers, rt.device))
    class_weights, table = class_weights_of(data.stats, cfg.weights, class_names)
    log.info("class statistics of %s/%s (%d images):\n%s", data.train_set.root, data.train_set.split,
             data.stats.num_images, table)
    train_loader, val_loader, steps_per_epoch = build_loaders(data, cfg, rt.device)
    model = place_model(build_model(cfg.model), rt)
    loss_fn = build_loss_fn(cfg, class_weights, rt.device)
    stop = StopSignals()  # installed once training starts
    length, opts = options.fit_for(steps_per_epoch, stop)
    parts = build_parts(cfg, model, rt, total_steps=length.total_steps)
    check_tile(opts.inference, model)  # known once the model is: before step 1
    state, last_step = _resume(tr.resume, run_dir, parts, class_weights)
    # DDP after the restore (it broadcasts rank 0's weights), torch.compile around the whole.
    parts.net = distributed.wrap_model(model, rt.device, cfg.model.sync_bn)
    if tr.compile:
        parts.net = torch.compile(parts.net)

    stop.install()  # SIGTERM, SIGUSR2, Ctrl-C: last.pt at the next step, then RunStopped
    _log_start(run_dir, rt, data, steps_per_epoch, length, tr)
    logger = TensorBoardLogger(run_dir / "tensorboard", class_names, ds.ignore_index, ds.mean, ds.std, tracker) \
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
            logger.hparams(hparams_of(OmegaConf.to_container(cfg, resolve=True), rt.amp_dtype),
                           hparams_metrics(final, state.best_metrics))
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
        report, last = options.analysis.report, out.last_evaluation
        write_report(run_dir / "eval" / ds.val_split, val_loader.dataset, getattr(last, "per_image", None),
                     getattr(last, "hard_cases", None) if report.galleries else None, class_names, report.worst_k,
                     ds.mean, ds.std, ds.ignore_index)
        write_metrics_json(run_dir / "metrics.json", class_names, data.stats, class_weights, final, state,
                           time.perf_counter() - start, digests, strategy=str(cfg.weights.strategy), monitor=tr.monitor,
                           split_sizes={ds.train_split: len(data.train_set), ds.val_split: len(data.val_set)})
        card = write_model_card(run_dir)
        if tracker is not None:
            _log_artifacts(tracker, run_dir, ds.val_split, card, cfg.tracking.log_checkpoints)
        log.info("final %s = %.4f, best %.4f at step %s; metrics in %s", tr.monitor, final[tr.monitor],
                 state.best_score, state.best_metrics.get("step"), run_dir / "metrics.json")
        log.info("dashboards: tensorboard --logdir %s", run_dir.resolve())
    return state.best_score


def _log_artifacts(tracker, run_dir: Path, val_split: str, card: Path, checkpoints: bool) -> None:
    """The run's record in the tracker: config, metrics, the evaluation report, the model card (the checkpoints
    with ``tracking.log_checkpoints``)."""
    for name in ("config.yaml", "metrics.json"):
        tracker.artifact(run_dir / name)
    tracker.artifact(card)
    tracker.artifact(run_dir / "eval" / val_split, f"eval/{val_split}")
    if checkpoints:
        for name in ("best.pt", "last.pt"):
            tracker.artifact(run_dir / "checkpoints" / name, "checkpoints")


def _resume(resume: str | None, run_dir: Path, parts, class_weights) -> tuple[TrainState, int | None]:
    """The progress to go on from (a fresh one without ``trainer.resume``), and the step of this run directory's
    last.pt when it is the checkpoint resumed from."""
    candidates = resolve_resume(resume, run_dir)
    if not candidates:
        return TrainState(), None
    state, resumed_from = restore_training(candidates, parts, class_weights)
    if state.early_stop:
        log.info("the run stopped early at step %d (%s): evaluating, not training further", state.step,
                 state.early_stop)
    return state, state.step if resumed_from == run_dir / "checkpoints" / "last.pt" else None


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
