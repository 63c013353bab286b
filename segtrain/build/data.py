"""Config -> data: datasets, their one checked pass, transforms, loaders, the palette of a dataset."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segtrain import distributed
from segtrain.build.model import resolve_num_workers
from segtrain.data import (EpochSampler, FolderDataset, ShardSampler, cityscapes, ensure_synthetic, eval_transform,
                           make_dataset, pad_collate, train_transform)
from segtrain.config.checks import is_multilabel
from segtrain.data.class_stats import ChannelStats, ClassStats
from segtrain.data.multilabel import fill_code, unpack
from segtrain.data.palette import parse_palette
from segtrain.data.repeat_factors import image_repeat_factors
from segtrain.data.scan_ranks import class_counts_over_ranks
from segtrain.data.shards import ShardDataset
from segtrain.data.voc import voc_palette
from segtrain.visualize import class_palette

log = logging.getLogger(__name__)


def palette_for(cfg: DictConfig, num_labels: int) -> np.ndarray:
    """The dataset's colours (its dataset.palette, VOC's or Cityscapes'), else a distinct-colour palette."""
    ds = cfg.dataset
    colours = [tuple(c) for c in class_palette(num_labels).tolist()]
    if ds.palette is not None:
        by_class = {cls: colour for colour, cls in parse_palette(ds.palette, ds.num_classes, ds.ignore_index).items()}
        colours = [by_class.get(c, colours[c]) for c in range(num_labels)]
    elif ds.layout == "voc":
        colours = voc_palette(num_labels)
    elif ds.layout == "cityscapes" and num_labels <= len(cityscapes.PALETTE):
        colours = list(cityscapes.PALETTE[:num_labels])
    return np.array(colours, dtype=np.uint8)


def _dataset_options(ds: DictConfig) -> dict:
    """The layout options the config sets; keys missing from older configs keep the class defaults."""
    keys = ("list_file", "label_mapping", "palette", "on_unknown_color", "on_bad_label", "regions")
    if ds.layout == "binary_masks":
        if ds.get("regions") is not None:
            raise ValueError("dataset.regions and dataset.layout=binary_masks both set: regions are made from a label "
                             "map; binary masks already give one file per channel")
        keys = ("list_file", "label_mapping", "palette", "class_names", "missing_mask")
    if ds.layout == "rasters":  # the tile grid (segtrain.data.raster_tiles)
        keys += ("tile_size", "tile_stride")
    return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
            for k in keys if (v := ds.get(k)) is not None}


def channels_of(ds: DictConfig) -> int | None:
    """The channel count of a multi-label dataset (``segtrain.data.multilabel``), None for single-label masks."""
    return ds.num_classes if is_multilabel(ds) else None


def mask_fill(ds: DictConfig) -> int:
    """The mask value of pixels that padding creates: ``ignore_index``, or a multi-label code ignored everywhere."""
    channels = channels_of(ds)
    return ds.ignore_index if channels is None else fill_code(channels)


def dataset_split(ds: DictConfig, split: str, transform=None, allow_unpaired: bool = False,
                  generate: bool = True) -> FolderDataset:
    """One split of the configured dataset; a ``dataset.generate`` section writes it first, or with ``generate=False``
    (a root read from a checkpoint) only checks that it is there as described."""
    if ds.layout == "shards":
        return shard_split_of(ds, split, transform)
    root = Path(ds.root).expanduser()
    if ds.get("generate") is not None:
        # Written once, by rank 0 under DDP; the other ranks wait for it here.
        distributed.on_main_then_broadcast(ensure_synthetic, root, ignore_index=ds.ignore_index, write=generate,
                                           **ds.generate)
    return make_dataset(ds.layout, root, split, num_classes=ds.num_classes,
                        ignore_index=ds.ignore_index, transform=transform, allow_unpaired=allow_unpaired,
                        **_dataset_options(ds))


def shard_split_of(ds: DictConfig, split: str, transform=None) -> ShardDataset:
    """A split stored as shards (``segtrain.data.shards``): its index read and checked against ``ds``."""
    if ds.sampling.repeat_thresh is not None:
        raise ValueError("dataset.sampling.repeat_thresh with dataset.layout=shards: repeat-factor sampling draws "
                         "images by index, shards are streamed; set it to null (rare_crop_p and cat_max_ratio work)")
    if is_multilabel(ds):
        raise ValueError("dataset.layout=shards holds one label-map mask per image: multi-label data is not sharded")
    urls = ds.get("urls") or {}
    return ShardDataset(ds.root, split, ds.num_classes, ds.ignore_index, transform, urls=urls.get(split),
                        class_names=ds.get("class_names"))


def split_counts(dataset: FolderDataset, workers: int = 0) -> np.ndarray:
    """(N, C) class counts of every pair, every pair checked: a bad pair stops here, before training.

    Under DDP each rank reads its share of the pairs (with ``workers`` loader workers) and every rank gets the
    whole matrix; rank 0 reads and writes the cache.
    """
    return class_counts_over_ranks(dataset, dataset.count_columns, dataset.ignore_index, num_workers=workers)


def stats_of(dataset: FolderDataset, counts: np.ndarray) -> ClassStats | ChannelStats:
    return ChannelStats.from_counts(counts) if dataset.multilabel else ClassStats.from_counts(counts)


def train_transform_of(ds: DictConfig, class_frequency) -> object:
    sampling = ds.sampling
    return train_transform(ignore_index=mask_fill(ds), mean=ds.mean, std=ds.std,
                           rare_crop_p=sampling.rare_crop_p or 0.0, cat_max_ratio=sampling.cat_max_ratio,
                           class_frequency=class_frequency, channels=channels_of(ds),
                           **OmegaConf.to_container(ds.augment))


def eval_transform_of(ds: DictConfig) -> object:
    return eval_transform(mean=ds.mean, std=ds.std, ignore_index=mask_fill(ds), val_resize=ds.val_resize)


def eval_split(ds: DictConfig, split: str, workers: int = 0, generate: bool = True) -> FolderDataset:
    """A split with the evaluation transform, its pairs checked first."""
    dataset = dataset_split(ds, split, eval_transform_of(ds), generate=generate)
    if not isinstance(dataset, ShardDataset):  # shards: checked when written, each read names its member
        split_counts(dataset, workers)
    return dataset


@dataclass
class TrainingData:
    train_set: FolderDataset
    val_set: FolderDataset
    train_counts: np.ndarray | None  # (N, C) pixels of each class in each training image; multi-label: (N, 2C);
    # None for shards, whose index holds the sums
    stats: ClassStats | ChannelStats  # derived from train_counts


def build_data(ds: DictConfig, workers: int = 0) -> TrainingData:
    """Both splits, every pair checked; the training transform gets the class frequencies it draws
    rare-class crops by."""
    train_set = dataset_split(ds, ds.train_split)
    if isinstance(train_set, ShardDataset):  # the index's sums: no pass over the data
        counts, stats = None, train_set.index.stats()
    else:
        counts = split_counts(train_set, workers)
        stats = stats_of(train_set, counts)
    train_set.transform = train_transform_of(ds, stats.frequency)
    return TrainingData(train_set, eval_split(ds, ds.val_split, workers), counts, stats)


def _repeat_factors(counts: np.ndarray, ds: DictConfig) -> np.ndarray | None:
    """Per-image repeat factors when ``dataset.sampling.repeat_thresh`` is set, else None."""
    thresh = ds.sampling.repeat_thresh
    if thresh is None:
        return None
    factors = image_repeat_factors(counts[:, : ds.num_classes] > 0, thresh)  # multi-label: the positive counts
    log.info("repeat-factor sampling (t=%g): %d of %d images repeated, mean factor %.3f, max %.3f", thresh,
             int((factors > 1).sum()), len(factors), factors.mean(), factors.max())
    return factors


def eval_loader(dataset, ds: DictConfig, workers: int, pin: bool = False) -> torch.utils.data.DataLoader:
    """In order, each image once over all ranks (one shard per rank under DDP)."""
    if isinstance(dataset, ShardDataset):
        dataset.plan(ds.batch_size_val, workers)
        return torch.utils.data.DataLoader(dataset, batch_size=ds.batch_size_val, num_workers=workers, pin_memory=pin,
                                           collate_fn=collate_of(ds), generator=_loader_generator())
    return torch.utils.data.DataLoader(
        dataset, batch_size=ds.batch_size_val, sampler=ShardSampler(len(dataset)), num_workers=workers,
        pin_memory=pin, collate_fn=collate_of(ds), generator=_loader_generator())


def _loader_generator() -> torch.Generator:
    """Else ``iter(loader)`` draws from torch's global generator, as dropout does: a run resumed mid-epoch would
    draw at another point and take other dropout masks. (Augmentation is seeded per sample: EpochSampler.)"""
    return torch.Generator().manual_seed(0)


@dataclass(frozen=True)
class PadCollate:
    """``pad_collate`` with the dataset's ignore_index; a class, so that loader workers can pickle it. With
    ``channels`` (multi-label) the masks are codes, padded as ignored everywhere and unpacked into (N, C, H, W)
    targets of 0, 1 and ``ignore_index``."""

    ignore_index: int
    channels: int | None = None

    def __call__(self, batch):
        if self.channels is None:
            return pad_collate(batch, self.ignore_index)
        images, codes = pad_collate(batch, fill_code(self.channels))
        return images, unpack(codes, self.channels, self.ignore_index)


def collate_of(ds: DictConfig) -> PadCollate:
    return PadCollate(ds.ignore_index, channels_of(ds))


def build_loaders(data: TrainingData, cfg: DictConfig, device: torch.device):
    """(train loader, val loader, optimizer steps per epoch)."""
    tr, ds = cfg.trainer, cfg.dataset
    workers = resolve_num_workers(tr.num_workers, device)
    pin = device.type == "cuda" if tr.pin_memory == "auto" else bool(tr.pin_memory)
    draws_per_step = tr.batch_size * tr.grad_accum
    train_set = data.train_set
    if isinstance(train_set, ShardDataset):
        return _shard_loaders(data, cfg, workers, pin)
    sampler = EpochSampler(len(train_set), cfg.seed, drop_last_batch_of=draws_per_step,
                           repeat_factors=_repeat_factors(data.train_counts, ds))
    if sampler.draws_per_rank < draws_per_step:
        raise ValueError(f"{train_set.root}: split '{train_set.split}' has {len(train_set)} images, fewer than "
                         f"trainer.batch_size * trainer.grad_accum = {draws_per_step}"
                         + (f" per rank ({sampler.world_size} ranks)" if sampler.world_size > 1 else ""))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=tr.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
        collate_fn=collate_of(ds), drop_last=True, generator=_loader_generator())
    val_loader = eval_loader(data.val_set, ds, workers, pin)
    return train_loader, val_loader, sampler.draws_per_rank // draws_per_step


def _shard_loaders(data: TrainingData, cfg: DictConfig, workers: int, pin: bool):
    """``build_loaders`` for shards: the dataset streams its epoch (``segtrain.data.shards``), no sampler."""
    tr, ds, train_set = cfg.trainer, cfg.dataset, data.train_set
    draws_per_step = tr.batch_size * tr.grad_accum
    train_set.train, train_set.seed = True, cfg.seed
    draws = train_set.plan(tr.batch_size, workers, draws_per_step)
    if draws < draws_per_step:
        raise ValueError(f"{train_set.index.path}: split '{train_set.split}' has {len(train_set)} samples, fewer than "
                         f"trainer.batch_size * trainer.grad_accum = {draws_per_step} per rank "
                         f"({distributed.world_size()} ranks)")
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=tr.batch_size, num_workers=workers, pin_memory=pin, collate_fn=collate_of(ds),
        drop_last=True, generator=_loader_generator())
    return train_loader, eval_loader(data.val_set, ds, workers, pin), draws // draws_per_step
