"""Albumentations presets built from a few config scalars.

Masks only ever go through nearest-neighbour resampling, and every pixel created by padding
is labelled ``ignore_index``, so augmentation never invents a class value.
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    ignore_index: int = 255,
    hflip: bool = True,
    vflip: bool = False,
    scale_range: Sequence[float] | None = None,
    crop_size: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    steps: list[A.BasicTransform] = []
    if scale_range is not None:
        low, high = scale_range
        # RandomScale's limits are relative to 1.
        steps.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                                   mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    if crop_size is not None:
        height, width = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        steps.append(A.PadIfNeeded(min_height=height, min_width=width, border_mode=cv2.BORDER_CONSTANT,
                                   fill=0, fill_mask=ignore_index))
        steps.append(A.RandomCrop(height=height, width=width))
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if vflip:
        steps.append(A.VerticalFlip(p=0.5))
    steps.append(A.Normalize(mean=mean, std=std))
    return A.Compose(steps)


def eval_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    # Models take any input size (they pad internally), so evaluation sees every pixel as it is.
    return A.Compose([A.Normalize(mean=mean, std=std)])
