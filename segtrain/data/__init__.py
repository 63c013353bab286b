"""Datasets, transforms, samplers and class statistics."""

from __future__ import annotations

import torch

from segtrain.data.folder import FolderDataset, read_image, read_mask
from segtrain.data.sampler import EpochSampler
from segtrain.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from segtrain.data.synthetic import ensure_synthetic
from segtrain.data.transforms import eval_transform, train_transform

__all__ = [
    "EpochSampler",
    "FolderDataset",
    "SYNTHETIC_CLASS_NAMES",
    "ensure_synthetic",
    "eval_transform",
    "pad_collate",
    "read_image",
    "read_mask",
    "train_transform",
]


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = 255):
    """Stack samples of different sizes: pad images with 0 and masks with ``ignore_index``.

    Padded pixels are ignored by every loss and metric, so they change nothing.
    """
    images, masks = zip(*batch)
    height = max(m.shape[0] for m in masks)
    width = max(m.shape[1] for m in masks)
    if all(m.shape == (height, width) for m in masks):
        return torch.stack(images), torch.stack(masks)
    out_images = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    out_masks = masks[0].new_full((len(masks), height, width), ignore_index)
    for i, (image, mask) in enumerate(zip(images, masks)):
        out_images[i, :, : mask.shape[0], : mask.shape[1]] = image
        out_masks[i, : mask.shape[0], : mask.shape[1]] = mask
    return out_images, out_masks
