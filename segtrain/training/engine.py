"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``.

Precision is chosen once (``Runtime``); the loop never branches on it except for the GradScaler, which only
fp16 needs. The loss is read back to the host only every ``log_every`` steps (``TrainMeter.flush``), so a
GPU is never stalled by a per-step ``.item()``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from segtrain import distributed
from segtrain.analysis.calibration import ReliabilityHistogram
from segtrain.analysis.hard_cases import HardCase, HardCases, galleries
from segtrain.analysis.per_image import PerImageConfusion
from segtrain.checkpoint import RunOutput, TrainState
from segtrain.errors import choice_message
from segtrain.inference import InferenceOptions, scored_logits
from segtrain.inference.postprocessing import apply_to_batch
from segtrain.metrics import ChannelConfusion, ConfusionMatrix, decide, flatten_metrics, format_table
from segtrain.runtime import Runtime
from segtrain.training.early_stopping import EarlyStopping
from segtrain.training.meter import TrainMeter
from segtrain.training.nonfinite import NonFiniteLoss, Snapshot, roll_back
from segtrain.training.parts import TrainParts
from segtrain.training.signals import RunStopped, StopSignals

log = logging.getLogger(__name__)

ROLLBACK = "rollback"  # train_one_epoch's answer when the run must go back to its last checkpoint


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
    inference: InferenceOptions | None = None  # how validation predicts; None: one whole-image pass
    checkpoint_every: int | None = None  # optimizer steps between last.pt writes inside an epoch
    stop: StopSignals | None = None  # checked after every optimizer step
    on_nonfinite: str = "stop"  # stop | skip | rollback (segtrain.training.nonfinite)
    max_skipped: int = 10  # skip: this many skipped steps in a row stop the run
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    early_stopping: EarlyStopping | None = None
    ema_evaluate: bool = True  # with trainer.ema: evaluate (and choose best.pt by) the averaged weights
    calibration_bins: int | None = 15  # reliability bins of val/ece; None: not measured
    tensorboard_k: int = 4  # worst images per class drawn as val/hard_cases/<class> at each evaluation
    report_k: int = 0  # worst images per class kept for the galleries of the report at the run's end (report.worst_k)
    multilabel: bool = False  # one sigmoid per channel, targets (N, C, H, W) (segtrain.data.multilabel)

    def checkpoint_due(self, step: int) -> bool:
        """Whether ``checkpoint_every`` asks for last.pt after optimizer step ``step``."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0


def train_one_epoch(parts: TrainParts, loader, loss_fn, rt: Runtime, state: TrainState, opts: FitOptions,
                    logger=None, on_step: Callable[[], None] | None = None) -> str | None:
    """Run the optimizer steps left in ``state.epoch``; the loader must start at the matching draw.
    ``on_step`` runs after every optimizer step but the epoch's last (which the caller handles).
    Returns the signal that stopped the epoch early (``opts.stop``), if one did, or ``ROLLBACK`` when the
    loss was not finite under ``trainer.on_nonfinite=rollback`` (``stop``: raises ``NonFiniteLoss``)."""
    net = parts.net.train()
    steps = opts.steps_per_epoch - state.step_in_epoch
    if opts.max_steps is not None:
        steps = min(steps, opts.max_steps - state.step)
    bar = tqdm(total=steps, desc=epoch_label(state.epoch + 1, opts), disable=not opts.progress, leave=False,
               dynamic_ncols=True)
    meter = TrainMeter(opts.class_names, opts.ignore_index, opts.grad_accum, opts.multilabel)
    batches = iter(loader)
    for i in range(steps):
        for micro in range(opts.grad_accum):
            images, masks = rt.to_device(*next(batches))
            # Under DDP the gradients are all-reduced once per optimizer step, at the last micro-batch.
            sync = micro == opts.grad_accum - 1 or not hasattr(net, "no_sync")
            with nullcontext() if sync else net.no_sync():
                with rt.autocast():
                    logits = net(images)
                    out = loss_fn(logits, masks)
                parts.scaler.scale(out["loss"] / opts.grad_accum).backward()
            meter.update(out, logits, masks)
        drop = opts.on_nonfinite == "skip" and _nonfinite_on_any_rank(meter.step_loss())
        skipped = parts.step(opts.grad_clip, update=not drop)
        meter.step(state.step + 1, skipped=drop)
        state.step += 1
        state.step_in_epoch += 1
        state.skipped_steps += skipped
        state.skipped_in_a_row = state.skipped_in_a_row + 1 if drop else 0
        if state.skipped_in_a_row >= opts.max_skipped:
            raise NonFiniteLoss(state.step, [], f"trainer.on_nonfinite=skip: {state.skipped_in_a_row} steps skipped in "
                                "a row (trainer.max_skipped)")
        bar.update(1)
        stop = opts.stop.requested(rt.device) if opts.stop is not None else None
        # The loss is read before every checkpoint, so that no checkpoint holds weights after a non-finite step.
        if meter.steps == opts.log_every or i == steps - 1 or stop or opts.checkpoint_due(state.step):
            interval = meter.flush(parts.scheduler.get_last_lr()[0], rt.device)
            state.train_seconds += interval.seconds
            state.images_seen += interval.images
            bar.set_postfix(loss=f"{interval.loss:.4f}", lr=f"{interval.scalars['train/lr']:.2e}",
                            img_s=f"{interval.images_per_s:.1f}")
            if logger is not None:
                logger.scalars({**interval.scalars, "train/skipped_steps": state.skipped_steps}, state.step)
            if interval.nonfinite_step is not None:
                if opts.on_nonfinite == "rollback":
                    bar.close()
                    return ROLLBACK
                raise NonFiniteLoss(interval.nonfinite_step, interval.nonfinite_terms, "trainer.on_nonfinite=stop")
        if stop:
            bar.close()
            return stop
        if on_step is not None and i < steps - 1:
            on_step()
    bar.close()
    return None


def _nonfinite_on_any_rank(loss: torch.Tensor) -> bool:
    """One host read per step (trainer.on_nonfinite=skip only); every rank gets the same answer."""
    return distributed.all_reduce_sum((~torch.isfinite(loss)).float().reshape(1)).item() > 0


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # ConfusionMatrix.compute() plus "loss" (and "ece", "class_ece" when measured)
    matrix: torch.Tensor  # (C, C) counts, rows = true class; multi-label (C, 2, 2), one per channel
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (image, target, prediction), CPU
    per_image: tuple[list[int], torch.Tensor] | None = None  # dataset indices, their (M, C, C) matrices (all ranks)
    calibration: ReliabilityHistogram | None = None
    hard_cases: list[list[HardCase]] | None = None  # per class, the worst images' shrunk predictions (all ranks)


@torch.no_grad()
def evaluate(model, loader, loss_fn, rt: Runtime, num_classes: int, ignore_index: int = 255,
             num_samples: int = 0, inference: InferenceOptions | None = None, per_image: bool = False,
             calibration_bins: int | None = None, multilabel: bool = False, postprocess=None,
             worst_k: int = 0) -> Evaluation:
    """Confusion-matrix metrics over the whole loader (summed over ranks under DDP), the mean loss per batch, the
    first ``num_samples`` images with their predictions. ``inference``: sliding windows, TTA (the log of the blended
    probabilities scored). ``per_image``: each image's confusion matrix, and with ``worst_k`` each class's ``worst_k``
    lowest-Dice images' predictions shrunk for the galleries (``hard_cases.HardCases``); ``calibration_bins``:
    reliability histograms, top-label / per-class ECE; all on the device, no host read per batch. ``multilabel``:
    (N, C, H, W) targets, a sigmoid and a 2x2 matrix per channel. ``postprocess``: a checkpoint's rules applied."""
    model.eval()
    matrix = (ChannelConfusion if multilabel else ConfusionMatrix)(num_classes, ignore_index, device=rt.device)
    images_cm = PerImageConfusion(num_classes, ignore_index, rt.device, multilabel) if per_image else None
    histogram = ReliabilityHistogram(num_classes, calibration_bins, ignore_index, rt.device, multilabel) \
        if calibration_bins else None
    # The dataset indices in the order the batches hold them (a streamed dataset says its own order).
    order = loader.dataset.sample_order() if hasattr(loader.dataset, "sample_order") else list(loader.sampler)
    hard = HardCases(num_classes, worst_k, rt.device, multilabel) if per_image and worst_k > 0 else None
    positions = torch.as_tensor(order, dtype=torch.int64, device=rt.device) if hard is not None else None  # once
    loss_sum, batches, seen = torch.zeros((), device=rt.device), 0, 0
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for images, masks in loader:
        images, masks = rt.to_device(images, masks)
        with rt.autocast():
            logits = scored_logits(model, images, masks.shape[-2:], inference)
            loss_sum += loss_fn(logits, masks)["loss"].float()
        preds = decide(logits, multilabel)
        if postprocess is not None:
            preds = apply_to_batch(logits, preds, postprocess, multilabel)
        matrix.update(preds, masks)
        if images_cm is not None:
            matrices = images_cm.update(preds, masks, order[seen : seen + images.shape[0]])
            if hard is not None:
                hard.update(matrices, preds, positions[seen : seen + images.shape[0]])
        if histogram is not None:
            histogram.update(logits, masks, None if multilabel or postprocess is not None else preds)
        batches += 1
        seen += images.shape[0]
        if len(samples) < num_samples:  # the loader is unshuffled: always the same images
            for j in range(min(num_samples - len(samples), images.shape[0])):
                samples.append((images[j].float().cpu(), masks[j].cpu(), preds[j].cpu()))
    matrix.all_reduce()
    metrics = matrix.compute()
    if histogram is not None:
        histogram.all_reduce()
        metrics["ece"], metrics["class_ece"] = histogram.ece(), histogram.class_ece()
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(batches), device=rt.device)]))
    metrics["loss"] = totals[0].item() / max(totals[1].item(), 1)
    return Evaluation(metrics, matrix.matrix.cpu(), samples, images_cm.gather() if images_cm is not None else None,
                      histogram, hard.gather() if hard is not None else None)


def epoch_label(number: int, opts: FitOptions) -> str:
    return f"epoch {number}/{opts.epochs}"  # 1-based: the progress bar's and the log's one numbering


def evaluated_at(state: TrainState, opts: FitOptions) -> str:
    """``after epoch 4/4 (step 160)`` at an epoch's end, ``in epoch 4/4 (step 150, 30 of its 40 steps)`` when the
    run stops inside one (``trainer.max_steps``, or ``trainer.steps``): the epoch the progress bar showed."""
    if state.step_in_epoch == 0:  # fit has counted the epoch just finished: state.epoch is its 1-based number
        return f"after {epoch_label(state.epoch, opts)} (step {state.step})"
    return (f"in {epoch_label(state.epoch + 1, opts)} (step {state.step}, {state.step_in_epoch} of its "
            f"{opts.steps_per_epoch} steps)")


def _improved(score: float, best: float | None, mode: str) -> bool:
    if math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


def _evaluate_and_keep_best(parts: TrainParts, val_loader, loss_fn, rt: Runtime, state: TrainState,
                            opts: FitOptions, out: RunOutput) -> dict[str, float]:
    result = evaluate(parts.eval_net(opts.ema_evaluate), val_loader, loss_fn, rt, len(opts.class_names),
                      opts.ignore_index, opts.num_samples if out.logger is not None else 0, opts.inference,
                      per_image=True, calibration_bins=opts.calibration_bins, multilabel=opts.multilabel,
                      worst_k=max(opts.tensorboard_k, opts.report_k))
    out.last_evaluation = result
    final = flatten_metrics(result.metrics, opts.class_names, "val")
    log.info("evaluation %s:\n%s", evaluated_at(state, opts), format_table(result.metrics, opts.class_names))
    if out.logger is not None:
        out.logger.scalars(final, state.step)
        hard = galleries(val_loader.dataset, result.hard_cases, opts.class_names, opts.tensorboard_k,
                         out.logger.mean, out.logger.std, opts.ignore_index)
        out.logger.evaluation(result.matrix, result.samples, state.step, hard, result.calibration)
    score = final.get(opts.monitor)
    if score is None:
        raise KeyError(choice_message("trainer.monitor", opts.monitor, sorted(final), "is not a logged metric"))
    if _improved(score, state.best_score, opts.monitor_mode):
        state.best_score = score
        state.best_metrics = {**final, "epoch": state.epoch, "step": state.step}
        out.save(parts, state, "best.pt")
    if opts.early_stopping is not None and (reason := opts.early_stopping.update(state, score)):
        state.early_stop = reason
        log.warning("early stop at step %d: %s", state.step, reason)
    return final


def fit(parts: TrainParts, train_loader, val_loader, loss_fn, rt: Runtime, state: TrainState, opts: FitOptions,
        out: RunOutput) -> dict[str, float]:
    """Train from ``state`` to the end of the schedule (or ``max_steps``); returns the last
    evaluation's flattened metrics (evaluating once if the run had nothing left to train).
    Writes ``last.pt`` after every epoch, every ``opts.checkpoint_every`` steps and at the stop,
    ``best.pt`` whenever ``opts.monitor`` improves."""
    final: dict[str, float] = {}
    # What orders the epoch: the sampler, or a streamed dataset itself (segtrain.data.shards).
    sampler = train_loader.dataset if hasattr(train_loader.dataset, "set_epoch") else train_loader.sampler
    snapshot = Snapshot.take(parts, state) if opts.on_nonfinite == "rollback" else None

    def save_last() -> None:
        nonlocal snapshot
        out.save_last(parts, state)
        if snapshot is not None:  # what a rollback returns to: this checkpoint, in host memory
            snapshot = Snapshot.take(parts, state)

    def checkpoint_on_schedule() -> None:
        if opts.checkpoint_due(state.step):
            save_last()

    while state.epoch < opts.epochs and state.early_stop is None:
        sampler.set_epoch(state.epoch, start=state.step_in_epoch * opts.grad_accum * opts.batch_size)
        signame = train_one_epoch(parts, train_loader, loss_fn, rt, state, opts, out.logger, checkpoint_on_schedule)
        if signame == ROLLBACK:
            roll_back(parts, state, snapshot, opts.rollback_lr_factor, opts.max_rollbacks)
            continue
        stopping = opts.max_steps is not None and state.step >= opts.max_steps
        epoch_done = state.step_in_epoch == opts.steps_per_epoch
        if epoch_done:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        # Without SyncBatchNorm each rank's BatchNorm statistics drifted apart: evaluate and save rank 0's.
        for module in (parts.model, parts.ema.module) if parts.ema is not None else (parts.model,):
            distributed.broadcast_buffers(module)
        evaluate_now = stopping or state.epoch == opts.epochs or (epoch_done and state.epoch % opts.eval_every == 0)
        if evaluate_now and (epoch_done or not signame):  # a signal mid-epoch: save and go, no evaluation
            final = _evaluate_and_keep_best(parts, val_loader, loss_fn, rt, state, opts, out)
        save_last()
        if out.logger is not None:
            out.logger.flush()
        if signame:
            raise RunStopped(signame, state.step, out.checkpoint_dir / "last.pt" if out.checkpoint_dir else "last.pt",
                             opts.stop.previous.get(signame))
        if stopping or state.early_stop:
            break
    if not final:  # resumed from a finished (or early-stopped) run: nothing left to train, still report
        result = evaluate(parts.eval_net(opts.ema_evaluate), val_loader, loss_fn, rt, len(opts.class_names),
                          opts.ignore_index, inference=opts.inference, per_image=True,
                          calibration_bins=opts.calibration_bins, multilabel=opts.multilabel, worst_k=opts.report_k)
        out.last_evaluation = result
        final = flatten_metrics(result.metrics, opts.class_names, "val")
    return final
