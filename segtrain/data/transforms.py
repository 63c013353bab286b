"""Albumentations presets built from a few config scalars.

Masks only ever go through nearest-neighbour resampling (the Compose forces it on every
step, user extras included), and every pixel created by padding is labelled
``ignore_index``, so augmentation never invents a class value.

Train: random scale -> pad to the crop (mask fill ``ignore_index``) -> crop (uniform, or
class-aware: ``segtrain.data.crop``) -> flips -> optional colour jitter -> user extras ->
normalise. Eval: normalise, then optionally pad to a multiple of 32 or resize the image.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np

from segtrain.data.crop import ClassAwareCrop
from segtrain.errors import choice_message

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transform_names() -> list[str]:
    return sorted(n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform))


def extra_transform(spec: Mapping[str, Any], ignore_index: int = 255) -> A.BasicTransform:
    """``{name: RandomBrightnessContrast, p: 0.5, ...}`` -> ``albumentations.RandomBrightnessContrast(p=0.5, ...)``.

    A transform that pads or warps the mask gets ``fill_mask=ignore_index`` unless the spec
    sets it, so that pixels it creates are ignored rather than labelled class 0.
    """
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"dataset.augment.extra: {dict(spec)!r} has no 'name' (an albumentations transform class)")
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        close = difflib.get_close_matches(name, _transform_names(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see https://albumentations.ai/docs/ for the names"
        raise ValueError(f"dataset.augment.extra: albumentations has no transform {name!r}; {hint}")
    options = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(options))
    # albumentations would only warn about a misspelt option, and drop it
    if unknown and not any(o.kind is inspect.Parameter.VAR_KEYWORD for o in options.values()):
        raise ValueError(f"dataset.augment.extra: {name} has no option {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(options)}")
    if "fill_mask" in options:
        kwargs.setdefault("fill_mask", ignore_index)
    if kwargs.get("mask_interpolation", cv2.INTER_NEAREST) != cv2.INTER_NEAREST:
        raise ValueError(f"dataset.augment.extra: {name} with mask_interpolation={kwargs['mask_interpolation']}; "
                         "masks are resampled nearest-neighbour only (labels must not be blended)")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"dataset.augment.extra: {name}({kwargs}): {err}") from None


def train_transform(
    ignore_index: int = 255,
    hflip: bool = True,
    vflip: bool = False,
    scale_range: Sequence[float] | None = None,
    crop_size: int | Sequence[int] | None = None,
    color_jitter: float | None = None,
    extra: Sequence[Mapping[str, Any]] | None = None,
    rare_crop_p: float = 0.0,
    cat_max_ratio: float | None = None,
    class_frequency: Sequence[float] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int | None = None,
) -> A.Compose:
    """The training preset; ``color_jitter=s`` jitters brightness, contrast and saturation by
    up to ``s`` and hue by up to ``s / 4`` (capped at 0.5), in 80% of the draws.
    ``class_frequency`` (``ClassStats.frequency`` of the training split) is what rare-class
    cropping (``rare_crop_p > 0``) draws classes by. ``channels``: the masks are multi-label codes of that many
    channels (``segtrain.data.multilabel``) and ``ignore_index`` is their padding code."""
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
        steps.append(ClassAwareCrop(height, width, ignore_index, rare_crop_p, cat_max_ratio, class_frequency,
                                    channels=channels))
    elif rare_crop_p or cat_max_ratio is not None:
        raise ValueError("dataset.sampling.rare_crop_p and cat_max_ratio choose where to crop: they need "
                         "dataset.augment.crop_size")
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if vflip:
        steps.append(A.VerticalFlip(p=0.5))
    if color_jitter:
        s = float(color_jitter)
        steps.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(s / 4, 0.5), p=0.8))
    steps += [extra_transform(spec, ignore_index) for spec in extra or ()]
    steps.append(A.Normalize(mean=mean, std=std))
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)


class ResizeImage(A.ImageOnlyTransform):
    """Resize the image so that its shorter side is ``size``, leaving the mask at full resolution."""

    def __init__(self, size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size = size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        scale = self.size / min(height, width)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cv2.resize(img, new, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def eval_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   ignore_index: int = 255, val_resize: str | int | None = None) -> A.Compose:
    """``val_resize``: None keeps every image as it is (the models pad internally); ``"pad32"``
    pads image and mask at the bottom/right to a multiple of 32 (mask fill ``ignore_index``,
    so the padding is never scored); an int resizes the image's shorter side to it and keeps
    the mask at its original resolution, so the logits must be resized back to the mask
    before the loss and the metrics."""
    steps: list[A.BasicTransform] = [A.Normalize(mean=mean, std=std)]
    if val_resize == "pad32":
        steps.append(A.PadIfNeeded(min_height=None, min_width=None, pad_height_divisor=32, pad_width_divisor=32,
                                   position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                                   fill_mask=ignore_index))
    elif isinstance(val_resize, int) and not isinstance(val_resize, bool) and val_resize > 0:
        steps.append(ResizeImage(val_resize))
    elif val_resize is not None:
        valid = ("null", "pad32", "a positive int (shorter side)")
        raise ValueError(choice_message("dataset.val_resize", val_resize, valid))
    return A.Compose(steps)
