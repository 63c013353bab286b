"""The checkpoint payload: written atomically, restored into a training run, read for inference.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` without unpickling arbitrary objects; the run's resolved
config travels as a YAML string. Keys:

    model, optimizer, scheduler, scaler   state dicts (``TrainParts.state_dict``)
    train_state                           ``TrainState`` as a dict
    rng                                   every random generator a step may touch
    config, overrides                     the resolved config (YAML) and the command line's overrides
    class_names, class_weights            as trained
    calibration                           only in a ``<name>_calibrated.pt`` (``segtrain.calibrate``): temperature,
                                          per-class bias, where they were fitted and what they changed there
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segtrain.atomic import atomic_write
from segtrain.config import apply_overrides, override_keys
from segtrain.config.compose import upgrade_saved
from segtrain.config.trust import check_file_config, under

log = logging.getLogger(__name__)

# What evaluation, inference and export read; a file without them is not a segtrain checkpoint.
INFERENCE_KEYS = ("model", "config", "class_names")


@dataclass
class TrainState:
    """Everything about progress that a resumed run needs besides the module states."""

    epoch: int = 0  # the epoch in progress, 0-based
    step: int = 0  # optimizer steps done in total
    step_in_epoch: int = 0
    best_score: float | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    images_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # optimizer steps without an update: trainer.on_nonfinite=skip, GradScaler overflows
    skipped_in_a_row: int = 0
    rollbacks: int = 0  # trainer.on_nonfinite=rollback
    early_best: float | None = None  # trainer.early_stopping: the best monitored value that counted as progress
    evals_without_progress: int = 0
    early_stop: str | None = None  # why the run stopped early; a resumed run does not train further


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(item) for item in items)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (``segtrain.atomic``), flushed to disk first: a crash
    mid-write leaves the previous checkpoint intact, a full disk is refused (``NoSpaceLeft``) before writing
    when the free space is below the tensors' size."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp), fsync=True, size_hint=tensor_bytes(state))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise RuntimeError(f"{path}: not a readable segtrain checkpoint ({type(err).__name__}: {err})") from err


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may touch, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_payload(parts, state: TrainState, meta: dict[str, Any]) -> dict[str, Any]:
    """The whole checkpoint of a run at ``state``: ``parts`` is an ``engine.TrainParts``."""
    return {**parts.state_dict(), "train_state": dataclasses.asdict(state), "rng": rng_state(), **meta}


# What resuming a run reads; a file without one of them is incomplete.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "train_state", "rng")


def _missing(ckpt: Any, keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` a loaded checkpoint lacks (all of them when it is not a dict)."""
    return [key for key in keys if key not in ckpt] if isinstance(ckpt, dict) else list(keys)


def step_checkpoints(folder: Path) -> list[Path]:
    """The ``step_<n>.pt`` files in ``folder``, newest (highest step) first."""
    steps = [(int(p.stem[5:]), p) for p in folder.glob("step_*.pt") if p.stem[5:].isdigit()]
    return [p for _, p in sorted(steps, reverse=True)]


def resolve_resume(resume: str | None, run_dir: Path) -> list[Path]:
    """``trainer.resume``: None/empty = start afresh (no candidates); ``auto`` = this run directory's
    last.pt, then its step_<n>.pt newest first, as fallbacks; a path = that checkpoint alone."""
    if not resume:
        return []
    if resume == "auto":
        folder = run_dir / "checkpoints"
        last = [folder / "last.pt"] if (folder / "last.pt").is_file() else []
        return last + step_checkpoints(folder)
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: no such checkpoint file")
    return [path]


def load_resumable(path: Path, parts) -> dict[str, Any]:
    """``path`` read and checked against ``parts`` (``engine.TrainParts``): every training key there, every
    model tensor of the expected shape. Raises ``RuntimeError`` naming the file and what is wrong."""
    ckpt = load_checkpoint(path)
    missing = _missing(ckpt, TRAINING_KEYS)
    if missing:
        raise RuntimeError(f"{path}: not a complete training checkpoint (no {', '.join(missing)})")
    expected = parts.model.state_dict()
    wrong = [f"{key} {tuple(value.shape)} (model: {tuple(expected[key].shape) if key in expected else 'absent'})"
             for key, value in ckpt["model"].items() if key not in expected or value.shape != expected[key].shape]
    absent = sorted(set(expected) - set(ckpt["model"]))
    if wrong or absent:
        raise RuntimeError(f"{path}: its weights do not fit this model: {'; '.join(wrong[:3] + absent[:3])}")
    return ckpt


def restore_training(candidates: list[Path], parts, class_weights: torch.Tensor) -> tuple[TrainState, Path]:
    """Load the first valid checkpoint of ``candidates`` into ``parts`` and the random generators; the
    progress to go on from and the file it came from. A candidate that fails its check is named in a
    warning beside the one used."""
    errors = []
    for path in candidates:
        try:
            ckpt = load_resumable(path, parts)
        except RuntimeError as err:
            errors.append(err)
            continue
        if errors:
            log.warning("%s; resuming from %s instead", "; ".join(map(str, errors)), path)
        break
    else:
        raise errors[0]
    parts.load_state_dict(ckpt)
    set_rng_state(ckpt["rng"])
    saved = ckpt.get("class_weights")
    if saved is not None and not torch.allclose(saved, class_weights.cpu()):
        log.warning("class weights differ from the checkpoint's: %s now, %s in %s", class_weights.tolist(),
                    saved.tolist(), path)
    state = TrainState(**ckpt["train_state"])
    log.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.step)
    return state, path


@dataclass
class RunOutput:
    """Where a run writes: checkpoints (``None``: nowhere, as on DDP ranks other than 0), the TensorBoard
    logger, and what every checkpoint carries besides the training state. ``parts``: an ``engine.TrainParts``."""

    checkpoint_dir: Path | None = None
    logger: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    keep_last: int = 1  # last.pt and the keep_last - 1 checkpoints before it, as step_<n>.pt
    last_step: int | None = None  # the step of the last.pt on disk, if any
    last_evaluation: Any = None  # the run's latest engine.Evaluation, for the report at its end

    def save(self, parts, state: TrainState, name: str) -> None:
        if self.checkpoint_dir is not None:
            save_checkpoint(training_payload(parts, state, self.meta), self.checkpoint_dir / name)

    def save_last(self, parts, state: TrainState) -> None:
        """``last.pt`` at ``state``; with ``keep_last > 1`` the previous one is renamed (not rewritten) to
        ``step_<n>.pt`` first, and step files beyond the newest ``keep_last - 1`` are removed."""
        if self.checkpoint_dir is None or self.last_step == state.step:
            return
        last = self.checkpoint_dir / "last.pt"
        if self.keep_last > 1 and self.last_step is not None and last.is_file():
            os.replace(last, self.checkpoint_dir / f"step_{self.last_step}.pt")
            for old in step_checkpoints(self.checkpoint_dir)[self.keep_last - 1:]:
                old.unlink()
        self.save(parts, state, "last.pt")
        self.last_step = state.step


@dataclass
class SavedModel:
    """What evaluation, inference and export read from a checkpoint. The run's normalisation
    (``config.dataset.mean``/``std``), palette and inference settings are in ``config``."""

    path: Path
    config: DictConfig  # the run's resolved config
    overrides: list[str]  # its command line, for composing further overrides on top
    weights: dict[str, torch.Tensor]  # the model's state dict: the EMA weights when the run evaluated those
    class_names: list[str]
    class_weights: torch.Tensor | None
    ema_weights: dict[str, torch.Tensor] | None = None  # trainer.ema's average, when the run kept one
    raw_weights: dict[str, torch.Tensor] | None = None
    calibration: dict[str, Any] | None = None  # segtrain.calibrate's temperature and bias, when fitted
    replaced: tuple[str, ...] = ()  # the keys and groups the user's overrides give, not taken from the file

    def choose_weights(self, config: DictConfig) -> SavedModel:
        """``weights`` = the EMA weights when there are some and ``config``'s trainer.ema.evaluate (as the run
        evaluated and chose best.pt), else the trained weights."""
        use_ema = self.ema_weights is not None and config.trainer.ema.evaluate
        self.weights = self.ema_weights if use_ema else self.raw_weights
        return self

    def user_gave(self, key: str) -> bool:
        """Whether ``key``'s value comes from the user's overrides (it or a group above it named there), not
        from the file: a dataset root read from a checkpoint is never written to (no data generated there)."""
        return under(key, self.replaced)


def _stored_config(path: Path, text: Any, overrides: list[str], replaced: tuple[str, ...]) -> DictConfig:
    """The checkpoint's config, refused (``config.trust.UntrustedConfig``) when it or its stored command line names
    code."""
    try:
        config = OmegaConf.create(text)
        tree = OmegaConf.to_container(config, resolve=True)
    except Exception as err:  # OmegaConf and YAML raise several types
        raise ValueError(f"{path}: its stored config does not read as a config ({type(err).__name__}: {err})") from err
    if not isinstance(tree, dict) or not all(isinstance(line, str) for line in overrides):
        raise ValueError(f"{path}: its stored config is not a mapping with a list of override strings")
    check_file_config(tree, overrides, path, replaced)
    return upgrade_saved(config)  # keys of today's configs that an older run lacks, filled once here


def read_for_inference(path: str | Path, replaced: tuple[str, ...] = ()) -> SavedModel:
    """The model, its config and its class metadata from a checkpoint (no optimizer state kept). The stored config
    is checked (``config.trust.check_file_config``) except under ``replaced``, the keys the caller's overrides give."""
    ckpt = load_checkpoint(path)
    missing = _missing(ckpt, INFERENCE_KEYS)
    if missing:
        raise ValueError(f"{path}: not a segtrain checkpoint (no {', '.join(missing)}); expected a "
                         "checkpoints/last.pt or best.pt written by python -m segtrain")
    overrides = list(ckpt.get("overrides", []))
    config = _stored_config(Path(path), ckpt["config"], overrides, replaced)
    ema = ckpt["ema"]["module"] if "ema" in ckpt else None
    saved = SavedModel(Path(path), config, overrides, ckpt["model"], list(ckpt["class_names"]),
                       ckpt.get("class_weights"), ema, ckpt["model"], ckpt.get("calibration"), tuple(replaced))
    return saved.choose_weights(config)


def read_with_overrides(path: str | Path, overrides: list[str] | None = None) -> tuple[SavedModel, DictConfig]:
    """The checkpoint, and its config with ``overrides`` applied (``config.apply_overrides``)."""
    overrides = list(overrides or [])
    saved = read_for_inference(path, tuple(override_keys(overrides)))
    cfg = apply_overrides(saved.config, saved.overrides, overrides)
    return saved.choose_weights(cfg), cfg
