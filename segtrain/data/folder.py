"""The folder layout: ``root/images/<split>/<stem>.<ext>`` paired with ``root/masks/<split>/<stem>.png``.

Masks are index PNGs: one class index per pixel (uint8 or uint16), ``ignore_index`` for
pixels that neither train nor score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _files_by_stem(directory: Path, extensions: Sequence[str]) -> dict[str, Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: directory not found")
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in extensions:
            if path.stem in files:
                raise ValueError(f"{directory}: two files share the stem '{path.stem}': {files[path.stem].name}, {path.name}")
            files[path.stem] = path
    return files


def _pair_files(image_dir: Path, mask_dir: Path) -> tuple[list[Path], list[Path]]:
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    masks = _files_by_stem(mask_dir, (".png",))
    only_images = sorted(set(images) - set(masks))
    only_masks = sorted(set(masks) - set(images))
    if only_images or only_masks:
        lines = [f"{images[s]}: no mask {mask_dir / (s + '.png')}" for s in only_images]
        lines += [f"{masks[s]}: no image with stem '{s}' in {image_dir}" for s in only_masks]
        raise FileNotFoundError("unpaired files:\n  " + "\n  ".join(lines))
    if not images:
        raise FileNotFoundError(
            f"{image_dir}: empty split, expected images ({', '.join(IMAGE_EXTENSIONS)}) with masks in {mask_dir}"
        )
    stems = sorted(images)
    return [images[s] for s in stems], [masks[s] for s in stems]


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # (H, W, 3) uint8, writable
    except OSError as err:
        raise OSError(f"{path}: cannot read image ({err})") from err


def read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"{path}: mask mode {img.mode!r}, expected a single-channel index PNG (L, P, I;16)"
                )
            # Palette PNGs keep their indices: np.asarray on mode P gives the index, not the colour.
            return np.asarray(img).astype(np.int64)  # (H, W)
    except OSError as err:
        raise OSError(f"{path}: cannot read mask ({err})") from err


class FolderDataset(torch.utils.data.Dataset):
    """Image/mask pairs matched by file stem; also the mask source for class statistics.

    ``__getitem__`` accepts an index, or an ``(index, seed)`` pair from
    :class:`segtrain.data.sampler.EpochSampler` that makes the random augmentation of that
    draw a pure function of the seed, whatever process or worker loads it.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int,
        ignore_index: int = 255,
        transform: Callable | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.label_mapping = None
        self.image_paths, self.mask_paths = _pair_files(self.root / image_dir / split, self.root / mask_dir / split)

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_mask(self, index: int) -> np.ndarray:
        """The raw label map of sample ``index``, before any augmentation."""
        return read_mask(self.mask_paths[index])

    def _checked_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = read_image(self.image_paths[index]), self.load_mask(index)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"{self.mask_paths[index]}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                f"image {self.image_paths[index].name} size {image.shape[1]}x{image.shape[0]}"
            )
        bad = (mask >= self.num_classes) | (mask < 0)
        bad &= mask != self.ignore_index
        if bad.any():
            values, counts = np.unique(mask[bad], return_counts=True)
            found = ", ".join(f"value {v} ({c} px)" for v, c in zip(values.tolist(), counts.tolist()))
            raise ValueError(
                f"{self.mask_paths[index]}: labels outside [0, {self.num_classes}) and != ignore_index "
                f"{self.ignore_index}: {found}"
            )
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self._checked_pair(index)
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W)
        return image.float() if image.dtype != torch.float32 else image, torch.as_tensor(mask).long()
