"""Prediction files, each written atomically (a temporary file in the same folder, then a rename),
so an interrupted run never leaves a half-written mask behind.

    <key>.png          index mask: one class index per pixel, uint8 (uint16 above 256 classes)
    <key>_color.png    the same mask with the class colours (a palette PNG up to 256 classes)
    <key>_overlay.jpg  the image with the colours blended over it
    <key>_prob.npz     float16 (K, H, W) probabilities, and the class names
    legend.png         the colours and class names, once per output folder

An image streamed by windows (``segtrain.inference.streaming``: a large or georeferenced TIFF) gives tiled TIFFs,
each with the input's georeference: ``<key>.tif`` (index mask) and ``<key>_color.tif`` (the same indices with the
colours as its colour map); no overlay nor probabilities.

Multi-label models (``MultilabelWriter``) write what their dataset layout reads (``dataset.layout=binary_masks``):

    <key>/<class>.png  one binary mask per channel, 0 absent, 255 present
    <key>_color.png    every channel in its colour on black, overlaps mixed (RGB)
    <key>_overlay.jpg  the same over the image
    <key>_prob.npz     float16 (C, H, W) sigmoid probabilities, and the channel names
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segtrain.atomic import atomic_write
from segtrain.data.raster import RasterReader, write_tiled
from segtrain.visualize import channel_colours, channel_overlay, legend

SUFFIXES = {"mask": ".png", "color": "_color.png", "overlay": "_overlay.jpg", "probabilities": "_prob.npz"}
RASTER_SUFFIXES = {"mask": ".tif", "color": "_color.tif"}  # a streamed image's files


def index_image(labels: np.ndarray, num_labels: int) -> Image.Image:
    """An index PNG of the labels: mode L (uint8) up to 256 labels, I;16 (uint16) above."""
    return Image.fromarray(labels.astype(np.uint8 if num_labels <= 256 else np.uint16))  # L or I;16


def color_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A palette PNG (its pixels are the indices, so it reads back as a mask) up to 256 colours, RGB above."""
    if len(palette) <= 256:
        image = Image.fromarray(labels.astype(np.uint8))  # mode L; a palette makes it P
        image.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
        return image
    return Image.fromarray(palette[labels])


def overlay_image(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    rgb = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    blended = alpha * palette[labels].astype(np.float32) + (1 - alpha) * rgb.astype(np.float32)
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


class PredictionWriter:
    """Writes the files of one output folder; ``kinds`` among ``SUFFIXES`` (the mask always)."""

    def __init__(self, root: Path, class_names: Sequence[str], palette: np.ndarray, kinds: Sequence[str]) -> None:
        self.root = Path(root)
        self.class_names = list(class_names)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.kinds = ["mask", *(k for k in kinds if k != "mask")]
        for kind in self.kinds:
            if kind not in SUFFIXES:
                raise ValueError(f"unknown output kind {kind!r}; valid: {', '.join(SUFFIXES)}")

    def paths(self, key: str) -> dict[str, Path]:
        return {kind: self.root / f"{key}{SUFFIXES[kind]}" for kind in self.kinds}

    @property
    def legend_path(self) -> Path:
        return self.root / "legend.png"

    def check_names(self, inputs: Iterable[tuple[str, Path]]) -> None:
        """Every file of every ``(key, source)`` and the legend a name of its own, checked before anything is written:
        ``x.png``'s colour mask and ``x_color.png``'s mask are both ``x_color.png``, an input ``legend.png``'s mask
        would be the legend."""
        owners: dict[Path, str] = {self.legend_path: "the legend"}
        for key, source in inputs:
            for kind, path in self.paths(key).items():
                owner = f"the {kind} of {source}"
                if path in owners:
                    raise ValueError(f"{owners[path]} and {owner} would both be {path}: rename one of the inputs, or "
                                     "predict them into separate output folders")
                owners[path] = owner

    def raster_paths(self, key: str) -> dict[str, Path]:
        """The files of a streamed image (``RASTER_SUFFIXES``), the kinds of ``self.kinds`` that have one."""
        return {kind: self.root / f"{key}{RASTER_SUFFIXES[kind]}" for kind in self.kinds if kind in RASTER_SUFFIXES}

    def done(self, key: str, raster: bool = False) -> bool:
        """Whether every output of ``key`` (a streamed image's with ``raster``) exists, for resuming a run."""
        return all(path.is_file() for path in (self.raster_paths(key) if raster else self.paths(key)).values())

    def write_legend(self) -> Path:
        strip = legend(360, self.class_names, self.palette, with_ignore=False)
        return atomic_write(self.legend_path, lambda tmp: strip.save(tmp, format="PNG"))

    def write(self, key: str, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
        """``labels`` (H, W) int; ``probs`` (K, H, W) when the probabilities are kept. The mask is
        written last: its presence means the other files of the image are complete."""
        paths = self.paths(key)
        for kind, path in paths.items():
            if kind == "color":
                atomic_write(path, lambda tmp: color_image(labels, self.palette).save(tmp, format="PNG"))
            elif kind == "overlay":
                atomic_write(path, lambda tmp: overlay_image(image, labels, self.palette).save(tmp, format="JPEG",
                                                                                               quality=90))
            elif kind == "probabilities":
                atomic_write(path, lambda tmp: self._save_probs(tmp, probs))
        atomic_write(paths["mask"], lambda tmp: index_image(labels, len(self.palette)).save(tmp, format="PNG"))

    def write_raster(self, key: str, height: int, width: int, bands, tags=()) -> None:
        """A streamed image's labels, ``bands`` of (rows, W) top to bottom, as ``raster_paths``' tiled TIFFs with the
        extra ``tags`` (``RasterReader.geo_tags``). The colour file is made from the mask's own tiles, read back
        row by row; the mask is renamed last, as ``write`` leaves it."""
        paths = self.raster_paths(key)
        dtype = np.uint8 if len(self.palette) <= 256 else np.uint16
        colormap = np.zeros((3, 1 << (8 * np.dtype(dtype).itemsize)), np.uint16)
        colormap[:, : len(self.palette)] = self.palette.T.astype(np.uint16) * 257  # 8 -> 16 bits: 255 -> 65535

        def mask_then_colour(tmp: Path) -> None:
            write_tiled(tmp, height, width, bands, dtype, tags)
            if "color" in paths:
                with RasterReader(tmp, "mask") as mask:
                    rows = (mask.labels(y, 0, min(256, height - y), width) for y in range(0, height, 256))
                    atomic_write(paths["color"], lambda out: write_tiled(out, height, width, rows, dtype, tags,
                                                                         colormap))

        atomic_write(paths["mask"], mask_then_colour)

    def _save_probs(self, tmp: Path, probs: np.ndarray) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probs.astype(np.float16), class_names=np.array(self.class_names))


class MultilabelWriter(PredictionWriter):
    """``PredictionWriter`` for multi-label decisions (C, H, W): the files in the module docstring. The channel masks
    are written last, the image's folder only then complete."""

    def paths(self, key: str) -> dict[str, Path]:
        paths = {kind: self.root / f"{key}{SUFFIXES[kind]}" for kind in self.kinds if kind != "mask"}
        return {**paths, **{f"mask of {name}": self.root / key / f"{name}.png" for name in self.class_names}}

    def write(self, key: str, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
        """``labels``: (C, H, W) bool decisions."""
        rgb = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
        for kind, path in self.paths(key).items():
            if kind == "color":
                colours = channel_colours(labels, self.palette)[0].round().astype(np.uint8)
                atomic_write(path, lambda tmp: Image.fromarray(colours).save(tmp, format="PNG"))
            elif kind == "overlay":
                picture = channel_overlay(rgb, labels, self.palette, alpha=0.5)
                atomic_write(path, lambda tmp: Image.fromarray(picture).save(tmp, format="JPEG", quality=90))
            elif kind == "probabilities":
                atomic_write(path, lambda tmp: self._save_probs(tmp, probs))
        (self.root / key).mkdir(parents=True, exist_ok=True)
        for c, name in enumerate(self.class_names):
            layer = Image.fromarray(labels[c].astype(np.uint8) * 255)
            atomic_write(self.root / key / f"{name}.png", lambda tmp: layer.save(tmp, format="PNG"))
