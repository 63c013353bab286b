"""A deterministic synthetic dataset with the class imbalance segtrain is built for.

Three classes on textured, noisy backgrounds:
  0 background  ~75% of pixels, a smooth colour field with pixel noise,
  1 region      ~20%, one or two large irregular blobs with a faint striped texture,
  2 spot        ~2%, small shaded discs; a quarter of the images have none, and flat
                square distractors of the same colours sit in the background.
A one-pixel band around every object boundary is labelled ``ignore_index`` (255), as in
Pascal VOC, so that border pixels whose class is ambiguous neither train nor score.

The generator writes PNG images and index-PNG masks in the folder layout
(``images/<split>/*.png``, ``masks/<split>/*.png``) and a ``synthetic.json`` recording its
parameters; training then reads them through the ordinary folder dataset.

``multilabel=True`` writes the multi-label variant in the ``binary_masks`` layout
(``masks/<split>/<stem>/{region,spot,scratch,ignore}.png``): the same region and spot shapes as
overlapping layers (a spot inside a region is in both), and a rare third layer, thin dark
scratches across everything in half of the images (``make_layers``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segtrain.atomic import atomic_write
from segtrain.errors import check_count

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "region", "spot")
LAYER_NAMES = ("region", "spot", "scratch")  # the channels of the multi-label set (generate.multilabel=true)
META_FILE = "synthetic.json"
GENERATOR_VERSION = 2
MIN_SIZE = 16  # the smallest image the shapes fit in


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.random((cells, cells, channels)).astype(np.float32)
    layers = [
        np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.BICUBIC))
        for c in range(channels)
    ]
    return np.clip(np.stack(layers, axis=-1), 0.0, 1.0)  # (size, size, channels)


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, radius: tuple[float, float]) -> np.ndarray:
    """An irregular ellipse: its radius wobbles with a few random angular harmonics."""
    size = yy.shape[0]
    cy, cx = rng.uniform(0.15 * size, 0.85 * size, size=2)
    ry, rx = rng.uniform(*radius, size=2)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(
        rng.uniform(0.0, 0.12) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    return (u / rx) ** 2 + (v / ry) ** 2 <= wobble**2


def _boundary_band(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds a different label (both sides of every edge)."""
    band = np.zeros(mask.shape, dtype=bool)
    vertical = mask[1:, :] != mask[:-1, :]
    horizontal = mask[:, 1:] != mask[:, :-1]
    band[1:, :] |= vertical
    band[:-1, :] |= vertical
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    return band


def make_sample(rng: np.random.Generator, size: int, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (H, W, 3), mask uint8 (H, W)) pair."""
    image, mask, _ = _draw(rng, size, ignore_index)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), mask


def make_layers(rng: np.random.Generator, scratch_rng: np.random.Generator, size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One multi-label sample: (image uint8 (H, W, 3), layers bool (H, W, 3) = region, spot, scratch, ignored
    bool (H, W)). Region and spot are ``make_sample``'s shapes, a spot inside a region positive in both; scratches,
    thin straight streaks in half of the images (about 1% of the pixels), cross everything: the rare layer that
    overlaps the others. The single-label boundary band is ignored in every channel. ``scratch_rng`` draws the
    scratches after ``rng`` has drawn the rest, so region and spot are ``make_sample``'s of the same ``rng``."""
    image, mask, region = _draw(rng, size, ignore_index=255)
    ignored = mask == 255
    scratch = np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(0 if scratch_rng.random() < 0.5 else int(scratch_rng.integers(1, 3))):
        y0, x0, y1, x1 = scratch_rng.uniform(0, size, size=4)
        length = max(np.hypot(y1 - y0, x1 - x0), 1.0)
        # distance of every pixel to the segment's line, and where along it the pixel lies
        along = ((yy - y0) * (y1 - y0) + (xx - x0) * (x1 - x0)) / length
        across = np.abs((yy - y0) * (x1 - x0) - (xx - x0) * (y1 - y0)) / length
        streak = (across <= max(0.75, size / 128)) & (along >= 0) & (along <= length)
        image[streak] = image[streak] * 0.45 + scratch_rng.uniform(0.0, 0.2)
        scratch |= streak
    layers = np.stack([region, mask == 2, scratch], -1) & ~ignored[..., None]
    picture = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return picture, layers, ignored


def _draw(rng: np.random.Generator, size: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float (H, W, 3) before clipping, mask uint8 (H, W), region layer bool (H, W))."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)

    base = rng.uniform(0.25, 0.65, size=3)
    image = base + 0.35 * (_smooth_field(rng, size, cells=6, channels=3) - 0.5)

    for _ in range(rng.integers(1, 3)):
        region = _blob(rng, yy, xx, radius=(0.14 * size, 0.3 * size))
        freq = rng.uniform(0.35, 0.7)
        angle = rng.uniform(0, np.pi)
        stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        tint = base + rng.uniform(-0.15, 0.15, size=3)
        image[region] = tint + 0.18 * (stripes[region, None] - 0.5)
        mask[region] = 1

    # Distractors: small flat squares of spot-like colour in the background. They are
    # background, so the rare class has to be told apart by shape and shading, not colour.
    for _ in range(rng.integers(0, 4)):
        half = int(rng.uniform(0.02, 0.045) * size) + 1
        cy, cx = rng.integers(half, size - half, size=2)
        patch = (slice(cy - half, cy + half), slice(cx - half, cx + half))
        image[patch] = np.clip(base + rng.uniform(0.12, 0.3), 0, 1)

    region_layer = mask == 1  # before spots cover parts of it
    num_spots = 0 if rng.random() < 0.25 else int(rng.integers(2, 9))
    for _ in range(num_spots):
        r = rng.uniform(0.03, 0.06) * size
        cy, cx = rng.uniform(r, size - r, size=2)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        spot = d2 <= r * r
        # A core fading outwards: shape and shading, not a flat colour, mark a spot.
        shade = 1.0 - 0.35 * d2[spot] / (r * r)
        colour = np.clip(base + rng.uniform(0.12, 0.3), 0, 1)
        image[spot] = colour * shade[:, None] + 0.05
        mask[spot] = 2

    image = image + rng.normal(0.0, 0.08, size=image.shape)
    mask[_boundary_band(mask)] = ignore_index
    return image, mask, region_layer


def _write_split(root: Path, split: str, count: int, size: int, seed: int, ignore_index: int,
                 multilabel: bool = False) -> None:
    image_dir, mask_dir = root / "images" / split, root / "masks" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # One generator per sample: sample i is the same whatever the split's length.
        rng = np.random.default_rng([seed, i])
        stem = f"{split}_{i:05d}"
        if multilabel:  # the binary_masks layout: masks/<split>/<stem>/<layer>.png and ignore.png
            image, layers, ignored = make_layers(rng, np.random.default_rng([seed, i, 1]), size)
            (mask_dir / stem).mkdir()
            for name, layer in zip((*LAYER_NAMES, "ignore"), (*np.moveaxis(layers, -1, 0), ignored)):
                Image.fromarray(layer.astype(np.uint8) * 255).save(mask_dir / stem / f"{name}.png")
        else:
            image, mask = make_sample(rng, size, ignore_index)
            Image.fromarray(mask).save(mask_dir / f"{stem}.png")
        Image.fromarray(image).save(image_dir / f"{stem}.png")


def _check_params(num_train: Any, num_val: Any, size: Any, seed: Any, ignore_index: Any) -> None:
    """Every parameter checked before anything on disk is touched: a wrong one must not cost the existing set."""
    for key, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("size", size, MIN_SIZE),
                            ("seed", seed, 0)):
        check_count(f"dataset.generate.{key}", value, "a whole number", minimum=low)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not \
            len(CLASS_NAMES) <= ignore_index <= 255:
        raise ValueError(f"dataset.ignore_index={ignore_index!r}: the synthetic set's masks are 8-bit PNGs of classes "
                         f"0..{len(CLASS_NAMES) - 1}; expected an ignore_index in {len(CLASS_NAMES)}..255 (255 as "
                         "usual)")


def ensure_synthetic(
    root: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    size: int = 128,
    seed: int = 0,
    ignore_index: int = 255,
    write: bool = True,
    multilabel: bool = False,
) -> Path:
    """Write the dataset under ``root`` unless the same parameters are already there.

    The parameters are checked first. A directory written with other parameters is regenerated; one that holds
    images but no ``synthetic.json`` was not written by this generator and is left untouched (error). The new set is
    written into a hidden folder beside and moved into place whole, so a failure leaves the old set (or nothing)
    and never a half-written one. ``write=False`` (a root read from a checkpoint) only checks that the set is there
    with these parameters.
    """
    _check_params(num_train, num_val, size, seed, ignore_index)
    root = Path(root)
    params = {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
        "ignore_index": ignore_index,
    }
    if multilabel:  # absent otherwise: a single-label set written before this key existed stays valid
        params["multilabel"] = True
    meta_path = root / META_FILE
    if meta_path.is_file() and json.loads(meta_path.read_text()) == params:
        return root
    if not write:
        found = "other parameters" if meta_path.is_file() else "no synthetic dataset"
        raise FileNotFoundError(f"{root}: {found} there, and this root was read from the checkpoint, where nothing is "
                                "generated; give dataset.root=<folder> on the command line to generate the set there")
    if not meta_path.is_file() and ((root / "images").exists() or (root / "masks").exists()):
        raise FileExistsError(
            f"{root}: holds images/ or masks/ but no {META_FILE}, so it was not written by the "
            "synthetic generator; choose another dataset.root or use dataset=folder"
        )
    staging = root / f".generating-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    log.info("writing synthetic dataset (%d train, %d val, %dx%d) to %s", num_train, num_val, size, size, root)
    try:
        _write_split(staging, "train", num_train, size, seed, ignore_index, multilabel)
        _write_split(staging, "val", num_val, size, seed + 1, ignore_index, multilabel)
        if meta_path.is_file():
            log.info("synthetic dataset at %s has other parameters; replacing it", root)
            meta_path.unlink()  # first: a set without its json is never taken for a complete one
        for sub in ("images", "masks"):
            shutil.rmtree(root / sub, ignore_errors=True)
            os.replace(staging / sub, root / sub)
        # Written last: its presence means the whole dataset is complete.
        atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(params, indent=2)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
