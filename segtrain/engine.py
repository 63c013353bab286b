"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``.

Precision is chosen once (``Runtime``); the loop itself never branches on it except for the
GradScaler, which only fp16 needs. The loss is read back to the host only every
``log_every`` steps, so a GPU is never stalled by a per-step ``.item()``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from segtrain import distributed
from segtrain.checkpoint import rng_state, save_checkpoint
from segtrain.metrics import ConfusionMatrix, SoftDiceTracker, class_argmax, flatten_metrics, format_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return images, masks.to(self.device, non_blocking=True)


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


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    steps_per_epoch: int
    batch_size: int
    class_names: list[str]
    ignore_index: int = 255
    grad_accum: int = 1
    grad_clip: float | None = None
    log_every: int = 10
    eval_every: int = 1
    max_steps: int | None = None
    monitor: str = "val/mDice"
    monitor_mode: str = "max"
    progress: bool = True
    num_samples: int = 4  # validation images drawn as overlays at every evaluation


def _optimizer_step(model, optimizer, scheduler, scaler, grad_clip: float | None) -> None:
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, rt: Runtime, state: TrainState,
                    opts: FitOptions, logger=None) -> None:
    """Run the optimizer steps left in ``state.epoch``; the loader must start at the matching draw."""
    model.train()
    steps = opts.steps_per_epoch - state.step_in_epoch
    if opts.max_steps is not None:
        steps = min(steps, opts.max_steps - state.step)
    bar = tqdm(total=steps, desc=f"epoch {state.epoch + 1}/{opts.epochs}", disable=not opts.progress,
               leave=False, dynamic_ncols=True)
    running: dict[str, torch.Tensor] = {}
    soft_dice = SoftDiceTracker(len(opts.class_names), opts.ignore_index)
    since_log, images_since_log, tick = 0, 0, time.perf_counter()
    batches = iter(loader)
    for i in range(steps):
        for micro in range(opts.grad_accum):
            images, masks = rt.to_device(*next(batches))
            # Under DDP the gradients are all-reduced once per optimizer step, at the last micro-batch.
            sync = micro == opts.grad_accum - 1 or not hasattr(model, "no_sync")
            with nullcontext() if sync else model.no_sync():
                with rt.autocast():
                    logits = model(images)
                    out = loss_fn(logits, masks)
                scaler.scale(out["loss"] / opts.grad_accum).backward()
            for key, value in out.items():
                running[key] = running.get(key, 0.0) + value.detach().float() / opts.grad_accum
            soft_dice.update(logits.detach(), masks)
            images_since_log += images.shape[0]
        _optimizer_step(model, optimizer, scheduler, scaler, opts.grad_clip)
        state.step += 1
        state.step_in_epoch += 1
        since_log += 1
        bar.update(1)
        if since_log == opts.log_every or i == steps - 1:
            # The one host sync; under DDP the mean over ranks, and images counted over all ranks.
            keys = sorted(running)
            totals = distributed.all_reduce_sum(torch.stack([running[k] for k in keys]))
            values = dict(zip(keys, (totals / (since_log * distributed.world_size())).tolist()))
            images_since_log *= distributed.world_size()
            elapsed = time.perf_counter() - tick
            state.train_seconds += elapsed
            state.images_seen += images_since_log
            lr = scheduler.get_last_lr()[0]
            speed = images_since_log / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
            dice = soft_dice.compute_and_reset()
            if logger is not None:
                scalars = {"train/loss" if k == "loss" else f"train/loss/{k}": v for k, v in values.items()}
                scalars.update({"train/lr": lr, "train/images_per_s": speed})
                scalars.update({f"train/soft_dice/{c}": v for c, v in zip(opts.class_names, dice.tolist())})
                if rt.device.type == "cuda":
                    scalars["train/gpu_memory_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
                logger.scalars(scalars, state.step)
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"training loss is {values['loss']} at step {state.step}")
            running, since_log, images_since_log, tick = {}, 0, 0, time.perf_counter()
    bar.close()


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # ConfusionMatrix.compute() plus "loss"
    matrix: torch.Tensor  # (C, C) counts, rows = true class
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (image, target, prediction), CPU


@torch.no_grad()
def evaluate(model, loader, loss_fn, rt: Runtime, num_classes: int, ignore_index: int = 255,
             num_samples: int = 0) -> Evaluation:
    """Confusion-matrix metrics over the whole loader (summed over ranks under DDP), the mean
    loss per batch, and the first ``num_samples`` images with their predictions."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device=rt.device)
    loss_sum, batches = torch.zeros((), device=rt.device), 0
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for images, masks in loader:
        images, masks = rt.to_device(images, masks)
        with rt.autocast():
            logits = model(images)
            if logits.shape[-2:] != masks.shape[-2:]:  # dataset.val_resize=<int>: score at the mask's resolution
                logits = torch.nn.functional.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear",
                                                         align_corners=False)
            loss_sum += loss_fn(logits, masks)["loss"].float()
        matrix.update(logits, masks)
        batches += 1
        if len(samples) < num_samples:  # the loader is unshuffled: always the same images
            preds = class_argmax(logits)
            for j in range(min(num_samples - len(samples), images.shape[0])):
                samples.append((images[j].float().cpu(), masks[j].cpu(), preds[j].cpu()))
    matrix.all_reduce()
    metrics = matrix.compute()
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(batches), device=rt.device)]))
    metrics["loss"] = totals[0].item() / max(totals[1].item(), 1)
    return Evaluation(metrics, matrix.matrix.cpu(), samples)


def _improved(score: float, best: float | None, mode: str) -> bool:
    if math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


def checkpoint_state(model, optimizer, scheduler, scaler, state: TrainState, extra: dict) -> dict:
    return {
        # torch.compile and DDP wrap the module; save the plain one's keys so any run can load them.
        "model": distributed.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": dataclasses.asdict(state),
        "rng": rng_state(),
        **extra,
    }


def fit(model, train_loader, val_loader, loss_fn, optimizer, scheduler, scaler, rt: Runtime, state: TrainState,
        opts: FitOptions, run_dir: Path, logger=None, extra: dict | None = None) -> dict[str, float]:
    """Train from ``state`` to the end of the schedule (or ``max_steps``); returns the last
    evaluation's flattened metrics. Writes ``checkpoints/last.pt`` after every epoch and at
    the stop, and ``checkpoints/best.pt`` whenever ``opts.monitor`` improves (rank 0 only under DDP)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    extra = extra or {}
    final: dict[str, float] = {}
    sampler = train_loader.sampler
    while state.epoch < opts.epochs:
        sampler.set_epoch(state.epoch, start=state.step_in_epoch * opts.grad_accum * opts.batch_size)
        train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, scaler, rt, state, opts, logger)
        stopping = opts.max_steps is not None and state.step >= opts.max_steps
        epoch_done = state.step_in_epoch == opts.steps_per_epoch
        if epoch_done:
            state.epoch += 1
            state.step_in_epoch = 0
        last_epoch = state.epoch == opts.epochs
        # Without SyncBatchNorm each rank's BatchNorm statistics drifted apart: evaluate and save rank 0's.
        distributed.broadcast_buffers(model)
        if stopping or last_epoch or (epoch_done and state.epoch % opts.eval_every == 0):
            result = evaluate(model, val_loader, loss_fn, rt, len(opts.class_names), opts.ignore_index,
                              opts.num_samples if logger is not None else 0)
            final = flatten_metrics(result.metrics, opts.class_names, "val")
            log.info("evaluation after epoch %d (step %d):\n%s", state.epoch, state.step,
                     format_table(result.metrics, opts.class_names))
            if logger is not None:
                logger.scalars(final, state.step)
                logger.evaluation(result.matrix, result.samples, state.step)
            score = final.get(opts.monitor)
            if score is None:
                raise KeyError(f"trainer.monitor={opts.monitor!r} is not a logged metric; valid: {', '.join(sorted(final))}")
            if _improved(score, state.best_score, opts.monitor_mode):
                state.best_score = score
                state.best_metrics = {**final, "epoch": state.epoch, "step": state.step}
                if distributed.is_main_process():
                    save_checkpoint(checkpoint_state(model, optimizer, scheduler, scaler, state, extra),
                                    ckpt_dir / "best.pt")
        if distributed.is_main_process():
            save_checkpoint(checkpoint_state(model, optimizer, scheduler, scaler, state, extra), ckpt_dir / "last.pt")
        if logger is not None:
            logger.flush()
        if stopping:
            break
    return final
