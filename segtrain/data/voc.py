"""Pascal VOC 2012 segmentation: ``root`` is the ``VOC2012`` directory of the VOCdevkit.

``JPEGImages/<id>.jpg`` with ``SegmentationClass/<id>.png`` (palette PNGs, read as their
indices; 255 marks the object borders and is ignored), the split being the ids listed in
``ImageSets/Segmentation/<split>.txt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from segtrain.data.folder import FolderDataset

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)



def voc_palette(num_classes: int = len(CLASS_NAMES)) -> list[tuple[int, int, int]]:
    """The colours of VOC's own palette PNGs: the bits of the class index spread over r, g, b
    from the most significant bit down (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...)."""
    colours = []
    for index in range(num_classes):
        rgb, value = [0, 0, 0], index
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        colours.append(tuple(rgb))
    return colours


LAYOUT = {
    "image_dir": "JPEGImages",
    "mask_dir": "SegmentationClass",
    "list_file": "ImageSets/Segmentation/{split}.txt",
    "image_suffixes": (".jpg",),
    "mask_suffix": ".png",
}


class VOCDataset(FolderDataset):
    def __init__(self, root: str | Path, split: str, num_classes: int = len(CLASS_NAMES), ignore_index: int = 255,
                 transform: Callable | None = None, **options: Any) -> None:
        options = {**LAYOUT, **{k: v for k, v in options.items() if v is not None}}
        super().__init__(root, split, num_classes, ignore_index, transform, **options)
