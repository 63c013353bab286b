"""Image/mask datasets on disk; the folder layout and the base of every other layout.

The folder layout is ``root/images/<split>/<stem>.<ext>`` paired with
``root/masks/<split>/<stem>.png`` by stem, or the pairs a list file names. Other layouts
(``segtrain.data.voc``, ``segtrain.data.cityscapes``) are the same class with other
directories, suffixes and label mappings; colour-coded masks are a decoding option
(``palette``) of any of them.

Masks are index PNGs (uint8 or uint16, ``ignore_index`` for pixels that neither train nor
score) unless a palette says otherwise; ``segtrain.data.masks`` reads, maps and checks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from segtrain.data.files import open_image
from segtrain.data.masks import MaskDecoder, read_mask
from segtrain.data.multilabel import RegionDecoder
from segtrain.data.pairing import Pairing, pair_by_key, pair_from_list

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

__all__ = ["IMAGE_EXTENSIONS", "FolderDataset", "check_image", "open_image", "read_image", "read_mask",
           "size_mismatch_error"]


# Modes whose values go beyond 0..255: ``convert("RGB")`` would clip them (a 12-bit camera image turns white).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _check_depth(img: Image.Image, path: Path) -> None:
    if img.mode in _WIDE_MODES:
        raise ValueError(f"{path}: a {'16-bit' if img.mode.startswith('I;16') else img.mode} image (mode {img.mode}); "
                         "segtrain reads 8-bit images (0..255) and would clip its values: convert it to 8 bits with "
                         "the scaling right for the data (e.g. a 12-bit camera's 0..4095: divide by 16)")


def read_image(path: Path, channels: int = 3) -> np.ndarray:
    """(H, W, 3) uint8 RGB, writable; ``channels=1`` gives (H, W, 1) grey, any other count the
    file's own channels, which must then be that many. A 16-bit or float image is refused, not clipped."""
    with open_image(path) as img:
        _check_depth(img, path)
        if channels in (1, 3):
            return np.array(img.convert("RGB" if channels == 3 else "L")).reshape(img.height, img.width, -1)
        array = np.array(img)
    array = array.reshape(*array.shape[:2], -1)
    if array.shape[-1] != channels:
        raise ValueError(f"{path}: an image of {array.shape[-1]} channels; the model takes {channels} "
                         "(model.in_channels)")
    return array


def check_image(path: Path) -> tuple[int, int]:
    """(height, width) of an image whose data is whole: a truncated file, one whose bytes changed or a 16-bit image
    stops here, not mid-training. The cheap way per format: a PNG's chunk checksums are verified (its pixels are
    not inflated), a JPEG decodes at 1/8 scale (every byte of it still read), other formats decode."""
    with open_image(path) as img:
        _check_depth(img, path)
        size = img.height, img.width
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        try:  # an OSError (truncated data) is named by open_image
            img.verify() if img.format == "PNG" else img.load()
        except (SyntaxError, ValueError) as err:  # Pillow's decoders raise these too for broken data
            raise OSError(f"broken data: {err}") from err
    return size


def size_mismatch_error(mask_path: Path, mask_hw: tuple[int, ...], image_path: Path,
                        image_hw: tuple[int, ...]) -> ValueError:
    return ValueError(f"{mask_path}: mask size {mask_hw[1]}x{mask_hw[0]} differs from image {image_path.name} "
                      f"size {image_hw[1]}x{image_hw[0]}")


def find_pairs(root: Path, split: str, image_dir: str, mask_dir: str, list_file: str | None,
               image_suffixes: Sequence[str], mask_suffix: str, recursive: bool) -> tuple[Path, Path, Pairing]:
    """(image folder, mask folder, their pairs): the pairs a list file names, else every image with the mask of its
    key. The directories and the list file are relative to ``root`` and may contain ``{split}``."""
    image_path, mask_path = (root / d.format(split=split) for d in (image_dir, mask_dir))
    if list_file is not None:
        pairing = pair_from_list(root / list_file.format(split=split), root, image_path, mask_path, image_suffixes,
                                 mask_suffix, recursive)
    else:
        pairing = pair_by_key(image_path, mask_path, image_suffixes, mask_suffix, recursive)
    return image_path, mask_path, pairing


class FolderDataset(torch.utils.data.Dataset):
    """Image/mask pairs of one split; also the mask source of the one pass over the pairs
    (``segtrain.data.scan``: ``root``, ``image_paths``, ``mask_paths``, ``decoder``).

    ``__getitem__`` accepts an index, or an ``(index, seed)`` pair from
    :class:`segtrain.data.sampler.EpochSampler` that makes the random augmentation of that
    draw a pure function of the seed, whatever process or worker loads it.

    ``image_dir``, ``mask_dir`` and ``list_file`` are relative to ``root`` and may contain
    ``{split}``. With ``list_file`` the split is the pairs it names (one key, or
    ``image_path mask_path``, per line); without, every image under ``image_dir`` paired with
    the mask of the same key. Unpaired files are an error listing all of them, unless
    ``allow_unpaired`` (then they are in ``self.unpaired``, for ``check_dataset.py``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int,
        ignore_index: int = 255,
        transform: Callable | None = None,
        *,
        image_dir: str = "images/{split}",
        mask_dir: str = "masks/{split}",
        list_file: str | None = None,
        image_suffixes: Sequence[str] = IMAGE_EXTENSIONS,
        mask_suffix: str = ".png",
        recursive: bool = False,
        label_mapping: Mapping | None = None,
        palette: Any = None,
        on_unknown_color: str = "error",
        on_bad_label: str = "error",
        allow_unpaired: bool = False,
        regions: Mapping | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        if regions is None:
            self.decoder = MaskDecoder(num_classes, ignore_index, label_mapping, palette, on_unknown_color,
                                       on_bad_label)
        else:  # multi-label: the regions of the label map, as int32 codes (segtrain.data.multilabel)
            self.decoder = RegionDecoder(regions, ignore_index, label_mapping=label_mapping, palette=palette,
                                         on_unknown_color=on_unknown_color, on_bad_label=on_bad_label)
            if self.decoder.channels != num_classes:
                raise ValueError(f"dataset.regions has {self.decoder.channels} regions "
                                 f"({', '.join(self.decoder.names)}) but dataset.num_classes={num_classes}: a "
                                 "multi-label model has one output channel per region")
        self.label_mapping = self.decoder.label_mapping
        image_path, mask_path, pairing = find_pairs(self.root, split, image_dir, mask_dir, list_file, image_suffixes,
                                                    mask_suffix, recursive)
        self.unpaired = self._accept(pairing, allow_unpaired)
        if not pairing.image_paths:
            source = f"no pairs in {self.root / list_file.format(split=split)}" if list_file else (
                f"expected images ({', '.join(image_suffixes)}) with masks in {mask_path}")
            raise FileNotFoundError(f"{image_path}: empty split '{split}', {source}")
        self.image_paths, self.mask_paths = pairing.image_paths, pairing.mask_paths

    @staticmethod
    def _accept(pairing: Pairing, allow_unpaired: bool) -> list[str]:
        if pairing.problems and not allow_unpaired:
            raise FileNotFoundError(f"unpaired files ({len(pairing.problems)}):\n  " + "\n  ".join(pairing.problems))
        return pairing.problems

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def count_columns(self) -> int:
        """Columns of the one pass's per-image counts: one per class, or per channel its positive then valid pixels."""
        return self.num_classes * (2 if self.multilabel else 1)

    @property
    def multilabel(self) -> bool:
        """Whether masks decode to multi-label codes (``segtrain.data.multilabel``), not class labels."""
        return hasattr(self.decoder, "channels")

    def load_mask(self, index: int) -> np.ndarray:
        """The label map of sample ``index`` after mapping and the label check, before any augmentation."""
        return self.decoder(self.mask_paths[index])

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_paths[index])

    def _checked_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # The class-statistics pass checked every pair before training; a file may change since.
        image, mask = self.load_image(index), self.load_mask(index)
        if image.shape[:2] != mask.shape:
            raise size_mismatch_error(self.mask_paths[index], mask.shape, self.image_paths[index], image.shape)
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        return finish_sample(self.transform, *self._checked_pair(index), seed)


def finish_sample(transform: Callable | None, image: np.ndarray, mask: np.ndarray,
                  seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded pair as training takes it: transformed (with ``seed``, the draw's augmentation is a function of it
    alone), the image (3, H, W) float32, the mask int64."""
    if transform is not None:
        if seed is not None:
            transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        image, mask = out["image"], out["mask"]
    image = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W)
    return image.float() if image.dtype != torch.float32 else image, torch.as_tensor(mask).long()
