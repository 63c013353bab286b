"""What a finished run reports: the HParams row, the weights digests, metrics.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from segtrain import distributed

log = logging.getLogger(__name__)


def hparams_of(config: dict, amp: torch.dtype | None) -> dict:
    """The run's main choices, as one row of TensorBoard's HParams table; ``config`` is the resolved config as a
    plain dict."""
    model, trainer, terms = config["model"], config["trainer"], config["loss"]["terms"]
    params = {
        "model": model["_target_"].rsplit(".", 1)[-1],
        "encoder": str(model.get("encoder")),
        "dataset": config["dataset"]["name"],
        "loss": "+".join(terms),
        "weights": str(config["weights"]["strategy"]),
        "optimizer": config["optimizer"]["_target_"].rsplit(".", 1)[-1],
        "lr": config["optimizer"]["lr"],
        "scheduler": config["scheduler"]["name"],
        "batch_size": trainer["batch_size"],
        "epochs": trainer["epochs"] if trainer["epochs"] is not None else -1,  # -1: set in steps
        "steps": trainer["steps"] if trainer["steps"] is not None else -1,
        "amp": str(amp).replace("torch.", "") if amp else "none",
        "seed": config["seed"],
    }
    for term, options in terms.items():
        for key, value in (options or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                params[f"loss/{term}/{key}"] = value
    return params


def hparams_metrics(final: dict[str, float], best: dict[str, float]) -> dict[str, float]:
    """The HParams row's metric columns: ``hparam/final/val/...`` and ``hparam/best/val/...``."""
    metrics = {f"hparam/final/{k}": v for k, v in final.items() if k.startswith("val/")}
    metrics.update({f"hparam/best/{k}": v for k, v in best.items() if k.startswith("val/")})
    return metrics


def gather_digests(model: torch.nn.Module) -> list[str]:
    """Every rank's parameter SHA-256 (DDP keeps them equal by construction; this shows it)."""
    digests = distributed.all_gather_objects(distributed.parameters_digest(model))
    if len(set(digests)) > 1:
        log.error("the ranks' weights differ after training (parameter SHA-256 per rank: %s)", digests)
    return digests


def write_metrics_json(path: Path, class_names: list[str], stats, class_weights: torch.Tensor, final: dict[str, float],
                       state, wall_time_s: float, digests: list[str], strategy: str, monitor: str,
                       split_sizes: dict[str, int] | None = None) -> None:
    """metrics.json: final and best metrics, the class weights used (by ``strategy``) and the data they came from
    (``split_sizes``: images per split; per class its training pixels and the training images containing it)."""
    multilabel = hasattr(stats, "positive")  # ChannelStats: a channel's pixels are its positive ones
    summary: dict[str, Any] = {
        "class_names": class_names,
        "class_weights": class_weights.tolist(),
        "class_pixel_share": stats.frequency.tolist(),
        "class_pixels": (stats.positive if multilabel else stats.pixel_count).tolist(),
        "class_images": (stats.images if multilabel else stats.image_count).tolist(),
        "split_sizes": dict(split_sizes or {}),
        "multilabel": multilabel,
        "weights_strategy": strategy,
        "monitor": monitor,
        "final": final,
        "best": state.best_metrics,
        "epochs": state.epoch,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "rollbacks": state.rollbacks,
        "early_stop": state.early_stop,  # null, or why the run stopped before the end of its schedule
        "wall_time_s": wall_time_s,
        "train_time_s": state.train_seconds,
        "images_per_s": state.images_seen / state.train_seconds if state.train_seconds else None,
        "world_size": distributed.world_size(),
        "parameters_sha256": digests,  # one per rank
    }
    path.write_text(json.dumps(summary, indent=2, allow_nan=True))
