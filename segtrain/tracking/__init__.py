"""Experiment trackers beside the run directory: ``tracking=mlflow`` (``segtrain.tracking.mlflow_run``).

    tracker = open_tracker(cfg, run_dir, overrides)   # None with tracking=none, and on every rank but 0
    TensorBoardLogger(..., tracker=tracker)            # every scalar TensorBoard gets, at the same step
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segtrain import distributed


def enabled(cfg: DictConfig) -> bool:
    tracking = cfg.get("tracking")
    return tracking is not None and tracking.backend == "mlflow"


def check_tracking(cfg: DictConfig) -> None:
    """Before training: the tracker's extra installed, its server answering (a bad ``tracking.uri`` stops here)."""
    if enabled(cfg):
        from segtrain.tracking.mlflow_run import check_uri

        try:
            check_uri(cfg.tracking.uri)
        except ImportError as err:  # named as a bad value: the commands stop on those without a traceback
            raise ValueError(str(err)) from None


def sweep_dir() -> Path | None:
    """The sweep directory of a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return Path(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None


def open_tracker(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None):
    """The run's tracker, its config logged as params; None with ``tracking=none`` and on ranks other than 0."""
    if not enabled(cfg) or not distributed.is_main_process():
        return None
    from segtrain.tracking.mlflow_run import flatten, start_run

    tracker = start_run(cfg.tracking, run_dir, list(overrides or []), sweep_dir())
    if not tracker.resumed:  # a resumed run's params are there (a changed value would be refused)
        tracker.params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    return tracker


def end_sweep(cfg: DictConfig) -> None:
    """Hydra's on_multirun_end: the sweep's parent run finished."""
    directory = Path(str(cfg.hydra.sweep.dir)) if cfg.get("hydra") is not None else None
    if enabled(cfg) and directory is not None:
        from segtrain.tracking.mlflow_run import end_sweep as end

        end(cfg.tracking, directory)
