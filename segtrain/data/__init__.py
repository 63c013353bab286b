"""Datasets, transforms, samplers and class statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from segtrain.data.binary_masks import BinaryMaskDataset
from segtrain.data.cityscapes import CityscapesDataset
from segtrain.data.folder import FolderDataset, read_image, read_mask
from segtrain.data.raster_tiles import RasterTileDataset
from segtrain.data.sampler import EpochSampler, ShardSampler
from segtrain.data.shards import ShardDataset
from segtrain.data.synthetic import ensure_synthetic
from segtrain.data.transforms import eval_transform, train_transform
from segtrain.data.voc import VOCDataset
from segtrain.errors import check_choice

__all__ = [
    "LAYOUTS",
    "BinaryMaskDataset",
    "CityscapesDataset",
    "EpochSampler",
    "ShardDataset",
    "ShardSampler",
    "FolderDataset",
    "VOCDataset",
    "ensure_synthetic",
    "eval_transform",
    "make_dataset",
    "pad_collate",
    "read_image",
    "read_mask",
    "train_transform",
]

# dataset.layout -> the class that finds and decodes its pairs
LAYOUTS: dict[str, type] = {
    "folder": FolderDataset,
    "voc": VOCDataset,
    "cityscapes": CityscapesDataset,
    "binary_masks": BinaryMaskDataset,
    "shards": ShardDataset,  # streamed from tar shards; built from its own keys (segtrain.build.data.shard_split_of)
    "rasters": RasterTileDataset,  # tiles of large TIFF / GeoTIFF pairs, read by windows
}


def make_dataset(layout: str, root: str | Path, split: str, num_classes: int, ignore_index: int = 255,
                 transform: Callable | None = None, **options: Any) -> FolderDataset:
    """One split of a dataset in ``layout`` (a key of ``LAYOUTS``); ``options`` go to its class."""
    check_choice("dataset.layout", layout, LAYOUTS)
    return LAYOUTS[layout](root, split, num_classes, ignore_index, transform, **options)


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = 255):
    """Stack samples of different sizes: pad images with 0 and masks with ``ignore_index``.

    Padded pixels are ignored by every loss and metric, so they change nothing. Images resized
    apart from their masks (``dataset.val_resize=<int>``) batch only when all the masks have
    one size: otherwise no single resize of the batch's logits would bring every prediction
    back onto its mask.
    """
    images, masks = zip(*batch)
    if all(i.shape[-2:] == m.shape for i, m in zip(images, masks)):
        height = max(m.shape[0] for m in masks)
        width = max(m.shape[1] for m in masks)
        if all(m.shape == (height, width) for m in masks):
            return torch.stack(images), torch.stack(masks)
    elif len({m.shape for m in masks}) > 1:
        raise ValueError("a batch mixes image and mask sizes (dataset.val_resize=<int> on images of different "
                         "sizes); set dataset.batch_size_val=1")
    return _pad_stack(images, 0.0), _pad_stack(masks, ignore_index)


def _pad_stack(tensors, fill) -> torch.Tensor:
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), fill)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out
