"""``dataset.layout=binary_masks``: one binary PNG per class per image (``segtrain.data.multilabel``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from segtrain.data.folder import IMAGE_EXTENSIONS, FolderDataset
from segtrain.data.multilabel import BinaryMaskDecoder
from segtrain.data.pairing import files_by_key, pair_keys


class BinaryMaskDataset(FolderDataset):
    """``dataset.layout=binary_masks``: ``root/images/<split>/<stem>.<ext>`` with the folder
    ``root/masks/<split>/<stem>/`` of per-class binary PNGs (see the module docstring)."""

    def __init__(self, root: str | Path, split: str, num_classes: int, ignore_index: int = 255,
                 transform: Callable | None = None, *, class_names: Sequence[str] | None = None,
                 missing_mask: str = "negative", image_dir: str = "images/{split}", mask_dir: str = "masks/{split}",
                 image_suffixes: Sequence[str] = IMAGE_EXTENSIONS, allow_unpaired: bool = False,
                 **unused: Any) -> None:
        for key in ("list_file", "label_mapping", "palette"):
            if unused.get(key) is not None:
                raise ValueError(f"dataset.{key} is not read by dataset.layout=binary_masks (one binary PNG per "
                                 "class per image)")
        self.root, self.split, self.transform = Path(root), split, transform
        self.ignore_index = ignore_index
        if class_names is None or len(class_names) != num_classes:
            raise ValueError("dataset.layout=binary_masks needs dataset.class_names, one per channel: the mask files "
                             f"are <class_name>.png (dataset.num_classes={num_classes})")
        self.decoder = BinaryMaskDecoder(class_names, missing_mask)
        self.label_mapping = self.decoder.label_mapping
        self.num_classes = num_classes
        image_path, mask_path = (self.root / d.format(split=split) for d in (image_dir, mask_dir))
        images = files_by_key(image_path, image_suffixes)
        if not mask_path.is_dir():
            raise FileNotFoundError(f"{mask_path}: directory not found (expected one folder per image, "
                                    "<stem>/<class_name>.png)")
        folders = {p.name: p for p in mask_path.iterdir() if p.is_dir()}
        pairing = pair_keys(images, folders, image_path, lambda key: f"no mask folder {mask_path / key}")
        self.unpaired = self._accept(pairing, allow_unpaired)
        if not pairing.image_paths:
            raise FileNotFoundError(f"{image_path}: empty split '{split}', expected images "
                                    f"({', '.join(image_suffixes)}) with mask folders in {mask_path}")
        self.image_paths, self.mask_paths = pairing.image_paths, pairing.mask_paths

    def mask_files(self) -> list[Path]:
        return [f for folder in self.mask_paths for f in self.decoder.files(Path(folder))]
