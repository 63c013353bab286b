"""``dataset.layout=rasters``: samples that are tiles of large image / mask rasters, each read as a window.

    root/images/<split>/<stem>.tif   8-bit grey or RGB, tiled or striped (segtrain.data.raster)
    root/masks/<split>/<stem>.tif    one band of integer labels, the image's size

Pairs are found by stem, or from ``dataset.list_file``, as in the folder layout (``segtrain.data.pairing``). Each
pair is cut into ``dataset.tile_size`` tiles every ``dataset.tile_stride`` pixels (default: the tile, no overlap),
the last row and column moved back to end at the border as inference's sliding windows are (``grid_starts``). A
pixel in two tiles (that margin, or every overlap when the stride is below the tile) belongs to the first of them in
raster order: in the others its label reads as ``ignore_index``, so that every pixel is counted, scored and trained
on once per epoch while each tile still shows the whole window as context. A raster smaller than the tile is one
tile of its own size. Only the
headers are read when the split is made; a sample decodes the segments its window overlaps.

One sample is one tile for the class-statistics pass too (``segtrain.data.scan``): ``mask_paths`` and
``image_paths`` name each tile's files, ``load_mask`` reads its mask window, ``check_image`` its image window, and
the tile grid is part of ``label_mapping`` (what changes the counts beyond the files, in the cache fingerprint).
Masks are mapped (``dataset.label_mapping``) and checked (``dataset.on_bad_label``) as ``MaskDecoder`` does.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from segtrain.data.folder import FolderDataset, find_pairs, size_mismatch_error
from segtrain.data.masks import MaskDecoder
from segtrain.data.raster import TIFF_SUFFIXES, RasterReader, grid_starts

_OPEN_READERS = 16  # per process: a split of thousands of rasters does not hold thousands of files open


class WindowMaskDecoder(MaskDecoder):
    """``MaskDecoder``'s mapping and label check, on a window of a mask raster."""

    def __call__(self, reader: RasterReader, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return self.check(self.map_labels(reader.labels(y0, x0, h, w)), f"{reader.path} (window y={y0} x={x0} {h}x{w})")


def _size(name: str, value: Any) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value or ())
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name}={value!r}: expected a size in pixels > 0 or [height, width] "
                         "(dataset.layout=rasters cuts each raster into tiles of dataset.tile_size)")
    return pair


class RasterTileDataset(FolderDataset):
    """The tiles of one split's raster pairs (see the module docstring); ``__getitem__`` as ``FolderDataset``'s."""

    def __init__(self, root: str | Path, split: str, num_classes: int, ignore_index: int = 255,
                 transform: Callable | None = None, *, tile_size: Any = None, tile_stride: Any = None,
                 image_dir: str = "images/{split}", mask_dir: str = "masks/{split}", list_file: str | None = None,
                 image_suffixes: Sequence[str] = TIFF_SUFFIXES, mask_suffix: str = ".tif", recursive: bool = False,
                 label_mapping: Mapping | None = None, on_bad_label: str = "error", allow_unpaired: bool = False,
                 palette: Any = None, regions: Any = None, on_unknown_color: str | None = None) -> None:
        for key, value in (("palette", palette), ("regions", regions)):
            if value is not None:
                raise ValueError(f"dataset.{key} is not read by dataset.layout=rasters (masks of integer labels, one "
                                 "class per pixel)")
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.ignore_index, self.transform = ignore_index, transform
        self.tile = _size("dataset.tile_size", tile_size)
        self.stride = _size("dataset.tile_stride", tile_stride if tile_stride is not None else tile_size)
        self.masks = WindowMaskDecoder(num_classes, ignore_index, label_mapping, on_bad_label=on_bad_label)
        self.label_mapping = {"labels": self.masks.label_mapping, "tiles": [*self.tile, *self.stride]}
        image_path, mask_path, pairing = find_pairs(self.root, split, image_dir, mask_dir, list_file, image_suffixes,
                                                    mask_suffix, recursive)
        self.unpaired = self._accept(pairing, allow_unpaired)
        if not pairing.image_paths:
            raise FileNotFoundError(f"{image_path}: empty split '{split}', expected rasters "
                                    f"({', '.join(image_suffixes)}) with masks in {mask_path}")
        self.windows: list[tuple[int, int, int, int, int]] = []  # (pair, y, x, h, w) of each sample
        self.owned: list[tuple[int, int]] = []  # each tile's first row and column not in an earlier tile
        self.image_paths, self.mask_paths = [], []
        for pair, (image, mask) in enumerate(zip(pairing.image_paths, pairing.mask_paths)):
            height, width = _pair_size(image, mask)
            th, tw = min(self.tile[0], height), min(self.tile[1], width)
            rows, cols = grid_starts(height, th, self.stride[0]), grid_starts(width, tw, self.stride[1])
            for i, y in enumerate(rows):
                for j, x in enumerate(cols):
                    self.windows.append((pair, y, x, th, tw))
                    self.owned.append((_first_owned(rows, i, th), _first_owned(cols, j, tw)))
                    self.image_paths.append(image)
                    self.mask_paths.append(mask)
        self._readers: OrderedDict[tuple[Path, str], RasterReader] = OrderedDict()
        self._pid = os.getpid()

    @property
    def multilabel(self) -> bool:
        return False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": OrderedDict()}  # files are opened again in each worker

    def _reader(self, path: Path, what: str) -> RasterReader:
        if self._pid != os.getpid():  # a forked worker: its parent's readers share file offsets with it
            self._readers, self._pid = OrderedDict(), os.getpid()
        key = (path, what)
        if key not in self._readers:
            self._readers[key] = RasterReader(path, what)
            if len(self._readers) > _OPEN_READERS:
                self._readers.popitem(last=False)[1].close()
        self._readers.move_to_end(key)
        return self._readers[key]

    def load_image(self, index: int) -> np.ndarray:
        """(h, w, 3) uint8 of tile ``index``'s image window."""
        _, y, x, h, w = self.windows[index]
        return self._reader(self.image_paths[index], "image").image(y, x, h, w)

    def load_mask(self, index: int) -> np.ndarray:
        """The labels of tile ``index``, mapped and checked (``dataset.on_bad_label``), before any augmentation."""
        _, y, x, h, w = self.windows[index]
        mask = self.masks(self._reader(self.mask_paths[index], "mask"), y, x, h, w)
        top, left = self.owned[index]
        if top or left:  # pixels an earlier tile holds: ignored here (the module docstring)
            mask = mask.copy()
            mask[:top] = self.ignore_index
            mask[:, :left] = self.ignore_index
        return mask

    def check_image(self, index: int) -> tuple[int, int]:
        """(height, width) of tile ``index``'s image window, every segment of it decoded (the class-statistics pass
        checks the window a sample reads, not the whole file)."""
        return self.load_image(index).shape[:2]


def _first_owned(starts: list[int], k: int, size: int) -> int:
    """Offset inside window ``k`` of its first pixel that window ``k - 1`` does not cover."""
    return 0 if k == 0 else max(0, starts[k - 1] + size - starts[k])


def _pair_size(image: Path, mask: Path) -> tuple[int, int]:
    """(height, width) of a pair from the headers: both read by windows, the same size."""
    with RasterReader(image, "image") as a, RasterReader(mask, "mask") as b:
        if (a.height, a.width) != (b.height, b.width):
            raise size_mismatch_error(mask, (b.height, b.width), image, (a.height, a.width))
        return a.height, a.width
