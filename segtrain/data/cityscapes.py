"""Cityscapes fine annotations, mapped to the 19 classes of the official benchmark.

``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` paired with
``root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png``. The masks store the 34 label ids;
``LABEL_TO_TRAIN_ID`` (the table of cityscapesScripts' ``labels.py``) maps them to train ids
0..18, and every other id (void, rare classes not scored) to ``ignore_index``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from segtrain.data.folder import FolderDataset

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# The benchmark's colour of each train id (cityscapesScripts' labels.py).
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

LAYOUT = {
    "image_dir": "leftImg8bit/{split}",
    "mask_dir": "gtFine/{split}",
    "image_suffixes": ("_leftImg8bit.png",),
    "mask_suffix": "_gtFine_labelIds.png",
    "recursive": True,  # one directory per city
}


class CityscapesDataset(FolderDataset):
    """``label_mapping`` defaults to ``LABEL_TO_TRAIN_ID``."""

    def __init__(self, root: str | Path, split: str, num_classes: int = len(CLASS_NAMES), ignore_index: int = 255,
                 transform: Callable | None = None, **options: Any) -> None:
        options = {**LAYOUT, **{k: v for k, v in options.items() if v is not None}}
        if options.get("palette") is None:
            options.setdefault("label_mapping", LABEL_TO_TRAIN_ID)
        super().__init__(root, split, num_classes, ignore_index, transform, **options)
