"""Compose the objects a run needs from its config, then hand them to ``engine.fit``.

This is the only module that reads the config tree; everything it calls takes plain arguments.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segtrain import distributed
from segtrain.checkpoint import load_checkpoint, set_rng_state
from segtrain.data import (EpochSampler, FolderDataset, ShardSampler, ensure_synthetic, eval_transform, make_dataset,
                           pad_collate, train_transform)
from segtrain.data.sampling import image_class_counts, image_repeat_factors
from segtrain.engine import FitOptions, Runtime, TrainState, evaluate, fit
from segtrain.logging import TensorBoardLogger
from segtrain.losses import build_loss
from segtrain.metrics import ConfusionMatrix, flatten_metrics
from segtrain.optim import param_groups
from segtrain.weights import STRATEGIES, compute_class_stats, compute_class_weights, weights_table

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
# Keys of the model config that configure training around the model, not the model class.
MODEL_TRAINING_KEYS = ("sync_bn",)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; under DDP the local rank's GPU."""
    return distributed.device_for(name)


def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """The model class ``model_cfg._target_`` names, with the config's arguments (not ``sync_bn``)."""
    options = OmegaConf.to_container(model_cfg, resolve=True)
    for key in MODEL_TRAINING_KEYS:
        options.pop(key, None)
    return instantiate(options)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the hardware has it (CUDA with bf16, CPUs with native bf16 units),
    else fp16 on CUDA and full precision on CPU, where emulated bf16 is slower than fp32."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"trainer.amp={amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    if num_workers != "auto":
        return int(num_workers)
    cores = os.cpu_count() or 1
    # Training on a small CPU, loader workers steal cores from the convolutions (see
    # docs/BENCHMARKS.md); a GPU run leaves the cores free for decoding.
    if device.type == "cpu" and cores <= 4:
        return 0
    return min(8, cores)


def class_names_of(ds: DictConfig) -> list[str]:
    names = ds.get("class_names") or [f"class_{i}" for i in range(ds.num_classes)]
    if len(names) != ds.num_classes:
        raise ValueError(f"dataset.class_names has {len(names)} names but dataset.num_classes={ds.num_classes}")
    return list(names)


def weights_column_options() -> dict[str, dict]:
    """Each strategy's options from its ``configs/weights/<strategy>.yaml``, so the class-weight
    table's columns show what ``weights=<strategy>`` would give, not bare function defaults."""
    weights_dir = Path(__file__).resolve().parents[1] / "configs" / "weights"
    return {name: OmegaConf.to_container(OmegaConf.load(weights_dir / f"{name}.yaml"), resolve=True)
            for name in STRATEGIES if name != "manual" and (weights_dir / f"{name}.yaml").is_file()}


def check_monitor(monitor: str, mode: str, class_names: list[str]) -> None:
    """Fail before training, not at the first evaluation, on a misspelt metric name."""
    # The names an evaluation will produce: those of an empty confusion matrix, plus the loss.
    valid = set(flatten_metrics(ConfusionMatrix(len(class_names)).compute(), class_names, "val")) | {"val/loss"}
    if monitor not in valid:
        raise KeyError(f"trainer.monitor={monitor!r} is not a logged metric; valid: {', '.join(sorted(valid))}")
    if mode not in ("max", "min"):
        raise ValueError(f"trainer.monitor_mode={mode!r}; valid: max, min")


def _dataset_options(ds: DictConfig) -> dict:
    """The layout options the config sets; keys missing from older configs keep the class defaults."""
    keys = ("list_file", "label_mapping", "palette", "on_unknown_color", "on_bad_label")
    return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
            for k in keys if (v := ds.get(k)) is not None}


def build_split(ds: DictConfig, split: str, train: bool, allow_unpaired: bool = False) -> FolderDataset:
    """One split of the configured dataset, with the train or the evaluation transform."""
    root = Path(ds.root).expanduser()
    if ds.name == "synthetic":
        # Written once, by rank 0 under DDP; the other ranks wait for it here.
        distributed.on_main_then_broadcast(ensure_synthetic, root, ignore_index=ds.ignore_index, **ds.generate)
    if train:
        sampling = ds.get("sampling") or {}
        transform = train_transform(ignore_index=ds.ignore_index, mean=ds.mean, std=ds.std,
                                    rare_crop_p=sampling.get("rare_crop_p") or 0.0,
                                    cat_max_ratio=sampling.get("cat_max_ratio"),
                                    **OmegaConf.to_container(ds.augment))
    else:
        transform = eval_transform(mean=ds.mean, std=ds.std, ignore_index=ds.ignore_index,
                                   val_resize=ds.get("val_resize"))
    return make_dataset(ds.get("layout", "folder"), root, split, num_classes=ds.num_classes,
                        ignore_index=ds.ignore_index, transform=transform, allow_unpaired=allow_unpaired,
                        **_dataset_options(ds))


def build_datasets(ds: DictConfig) -> tuple[FolderDataset, FolderDataset]:
    return build_split(ds, ds.train_split, train=True), build_split(ds, ds.val_split, train=False)


def _repeat_factors(train_set, ds: DictConfig, workers: int):
    """Per-image repeat factors when ``dataset.sampling.repeat_thresh`` is set, else None."""
    thresh = (ds.get("sampling") or {}).get("repeat_thresh")
    if thresh is None:
        return None
    # Rank 0 reads the masks (and writes the cache) once; the other ranks receive the counts.
    counts = distributed.on_main_then_broadcast(image_class_counts, train_set, ds.num_classes, ds.ignore_index,
                                                num_workers=workers)
    factors = image_repeat_factors(counts > 0, thresh)
    log.info("repeat-factor sampling (t=%g): %d of %d images repeated, mean factor %.3f, max %.3f", thresh,
             int((factors > 1).sum()), len(factors), factors.mean(), factors.max())
    return factors


def build_loaders(train_set, val_set, cfg: DictConfig, device: torch.device):
    tr, ds = cfg.trainer, cfg.dataset
    workers = resolve_num_workers(tr.num_workers, device)
    pin = device.type == "cuda" if tr.pin_memory == "auto" else bool(tr.pin_memory)
    draws_per_step = tr.batch_size * tr.grad_accum
    if getattr(train_set, "needs_class_frequencies", False):
        # train() normally hands over its statistics first; this reads the same cached ones.
        log.info("rare-class cropping: reading the class frequencies of %s/%s", train_set.root, train_set.split)
        train_set.set_class_frequencies(distributed.on_main_then_broadcast(
            compute_class_stats, train_set, ds.num_classes, ds.ignore_index, num_workers=workers).frequency)
    sampler = EpochSampler(len(train_set), cfg.seed, drop_last_batch_of=draws_per_step,
                           repeat_factors=_repeat_factors(train_set, ds, workers))
    if sampler.draws_per_rank < draws_per_step:
        raise ValueError(f"{train_set.root}: split '{train_set.split}' has {len(train_set)} images, fewer than "
                         f"trainer.batch_size * trainer.grad_accum = {draws_per_step}"
                         + (f" per rank ({sampler.world_size} ranks)" if sampler.world_size > 1 else ""))
    collate = lambda batch: pad_collate(batch, ds.ignore_index)  # noqa: E731
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=tr.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
        collate_fn=collate, drop_last=True)
    # In order, each image once over all ranks (one shard per rank under DDP).
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=ds.batch_size_val, sampler=ShardSampler(len(val_set)), num_workers=workers,
        pin_memory=pin, collate_fn=collate)
    return train_loader, val_loader, sampler.draws_per_rank // draws_per_step


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        path = run_dir / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: no such checkpoint file")
    return path


def _restore(path: Path, model, optimizer, scheduler, scaler, class_weights) -> TrainState:
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    saved = ckpt.get("class_weights")
    if saved is not None and not torch.allclose(saved, class_weights.cpu()):
        log.warning("class weights differ from the checkpoint's: %s now, %s in %s", class_weights.tolist(),
                    saved.tolist(), path)
    state = TrainState(**ckpt["train_state"])
    log.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.step)
    return state


def hparams_of(cfg: DictConfig, amp: torch.dtype | None) -> dict:
    """The run's main choices, as one row of TensorBoard's HParams table."""
    params = {
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "encoder": str(cfg.model.get("encoder")),
        "dataset": cfg.dataset.name,
        "loss": "+".join(cfg.loss.terms),
        "weights": cfg.weights.strategy,
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "lr": cfg.optimizer.lr,
        "scheduler": cfg.scheduler.name,
        "batch_size": cfg.trainer.batch_size,
        "epochs": cfg.trainer.epochs,
        "amp": str(amp).replace("torch.", "") if amp else "none",
        "seed": cfg.seed,
    }
    for term, options in cfg.loss.terms.items():
        for key, value in (options or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                params[f"loss/{term}/{key}"] = value
    return params


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> float:
    """Train as ``cfg`` says, writing everything under ``run_dir``; returns the best monitored score.

    ``overrides`` (the command line's) are stored in the checkpoints, so that
    ``python -m segtrain.evaluate`` can apply further overrides on top of the same composition.

    Under torchrun (``segtrain.distributed``) every rank calls this; rank 0's ``run_dir`` is the
    run's, and only rank 0 writes into it (config, logs, TensorBoard, checkpoints, metrics.json).
    """
    distributed.init_from_env()
    distributed.quiet_other_ranks()
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    main_process = distributed.is_main_process()
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tr, ds = cfg.trainer, cfg.dataset
    seed_everything(cfg.seed, tr.deterministic)
    device = resolve_device(tr.device)
    rt = Runtime(device, resolve_amp(tr.amp, device), tr.channels_last)
    class_names = class_names_of(ds)
    check_monitor(tr.monitor, tr.monitor_mode, class_names)

    train_set, val_set = build_datasets(ds)
    # One pass over the masks, on rank 0 (which writes the cache); the other ranks receive the result.
    stats = distributed.on_main_then_broadcast(compute_class_stats, train_set, ds.num_classes, ds.ignore_index,
                                               num_workers=resolve_num_workers(tr.num_workers, device))
    train_set.set_class_frequencies(stats.frequency)  # rare-class cropping draws classes by 1 / frequency
    class_weights = compute_class_weights(stats, class_names=class_names, **cfg.weights)
    table = weights_table(stats, class_names, cfg.weights.strategy, weights=class_weights,
                          column_options=weights_column_options())
    log.info("class statistics of %s/%s (%d images):\n%s", train_set.root, train_set.split, stats.num_images, table)

    train_loader, val_loader, steps_per_epoch = build_loaders(train_set, val_set, cfg, device)
    model = build_model(cfg.model).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss, class_weights, num_classes=ds.num_classes, ignore_index=ds.ignore_index).to(device)
    optimizer = instantiate(cfg.optimizer)(param_groups(model, cfg.optimizer.get("weight_decay", 0.0)))
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps_per_epoch * tr.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp_dtype == torch.float16)

    state = TrainState()
    resume_path = resolve_resume(tr.resume, run_dir)
    if resume_path is not None:
        state = _restore(resume_path, model, optimizer, scheduler, scaler, class_weights)
    # DDP after the restore (it broadcasts rank 0's weights), torch.compile around the whole.
    model = distributed.wrap_model(model, device, cfg.model.get("sync_bn", "auto"))
    forward_model = torch.compile(model) if tr.compile else model

    log.info("run directory: %s", run_dir.resolve())
    log.info("device %s, amp %s, %d train / %d val images, %d steps per epoch, %d epochs", device,
             rt.amp_dtype or "none", len(train_set), len(val_set), steps_per_epoch, tr.epochs)
    ranks = distributed.world_size()
    log.info("global batch %d = %d per rank x %d rank%s x %d accumulation step%s", tr.batch_size * ranks * tr.grad_accum,
             tr.batch_size, ranks, "s" if ranks > 1 else "", tr.grad_accum, "s" if tr.grad_accum > 1 else "")
    log.info("open the dashboards with: tensorboard --logdir %s", run_dir.resolve())
    logger = TensorBoardLogger(run_dir / "tensorboard", class_names, ds.ignore_index, ds.mean, ds.std) \
        if main_process else None
    if logger is not None:
        logger.text("data/class_weights", table)
    opts = FitOptions(
        epochs=tr.epochs, steps_per_epoch=steps_per_epoch, batch_size=tr.batch_size, class_names=class_names,
        ignore_index=ds.ignore_index, grad_accum=tr.grad_accum, grad_clip=tr.grad_clip, log_every=tr.log_every,
        eval_every=tr.eval_every, max_steps=tr.max_steps, monitor=tr.monitor, monitor_mode=tr.monitor_mode,
        progress=tr.progress, num_samples=tr.num_samples)
    extra = {"config": OmegaConf.to_yaml(cfg, resolve=True), "overrides": list(overrides or []),
             "class_names": class_names, "class_weights": class_weights.cpu()}
    start = time.perf_counter()
    try:
        final = fit(forward_model, train_loader, val_loader, loss_fn, optimizer, scheduler, scaler, rt, state,
                    opts, run_dir, logger, extra)
        if not final:  # resumed from a finished run: nothing left to train, still report
            final = flatten_metrics(evaluate(forward_model, val_loader, loss_fn, rt, ds.num_classes,
                                             ds.ignore_index).metrics, class_names, "val")
        summary_metrics = {f"hparam/final/{k}": v for k, v in final.items() if k.startswith("val/")}
        summary_metrics.update({f"hparam/best/{k}": v for k, v in state.best_metrics.items() if k.startswith("val/")})
        if logger is not None:
            logger.hparams(hparams_of(cfg, rt.amp_dtype), summary_metrics)
            logger.text("data/class_statistics", table, state.step)
    finally:
        if logger is not None:
            logger.close()
    # DDP keeps the ranks' weights equal by construction; the digests show it for this run.
    digests = distributed.all_gather_objects(distributed.parameters_digest(model))
    if len(set(digests)) > 1:
        log.error("the ranks' weights differ after training (parameter SHA-256 per rank: %s)", digests)
    if not main_process:
        return state.best_score
    summary = {
        "class_names": class_names,
        "class_weights": class_weights.tolist(),
        "class_pixel_share": stats.frequency.tolist(),
        "weights_strategy": cfg.weights.strategy,
        "monitor": tr.monitor,
        "final": final,
        "best": state.best_metrics,
        "epochs": state.epoch,
        "steps": state.step,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": state.train_seconds,
        "images_per_s": state.images_seen / state.train_seconds if state.train_seconds else None,
        "world_size": ranks,
        "parameters_sha256": digests,  # one per rank
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
    log.info("final %s = %.4f, best %.4f at step %s; metrics in %s", tr.monitor, final[tr.monitor],
             state.best_score, state.best_metrics.get("step"), run_dir / "metrics.json")
    log.info("dashboards: tensorboard --logdir %s", run_dir.resolve())
    return state.best_score
