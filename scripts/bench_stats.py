"""Throughput of the class-statistics pass (decode and count every training mask), by worker count.

The pass is ``segtrain.data.class_stats.compute_class_stats`` with the cache off, reading index PNGs
with the training code's ``read_mask``. The masks are generated once under ``--root`` (512x512
uint8, four classes of very different sizes and a one-pixel ignore band at every border) and
reused by later runs. Worker counts are measured in turn (0, 2, 0, 2, ...), so that a slow
phase of the shared machine hits all of them alike; each is reported as the median of its
runs and as a ratio to the first (the reference, normally 0 workers).

    python scripts/bench_stats.py                        # 2000 masks, 0 vs 2 workers, 3 runs each
    python scripts/bench_stats.py --count 400 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.data.class_stats import compute_class_stats
from segtrain.data.folder import read_mask

NUM_CLASSES = 4
IGNORE_INDEX = 255
META_FILE = "bench_stats.json"


class MaskFiles:
    """A mask source for compute_class_stats: the PNGs under ``<root>/masks``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mask_paths = sorted((root / "masks").glob("*.png"))
        self.label_mapping = None

    def load_mask(self, index: int) -> np.ndarray:
        return read_mask(self.mask_paths[index])


def _ellipse(mask: np.ndarray, rng: np.random.Generator, label: int, radius: tuple[float, float]) -> None:
    size = mask.shape[0]
    cy, cx = rng.uniform(0, size, 2)
    ry, rx = rng.uniform(*radius, 2)
    # Only the bounding box is evaluated: the masks are generated at some hundred per second.
    y0, y1 = max(0, int(cy - ry)), min(size, int(cy + ry) + 1)
    x0, x1 = max(0, int(cx - rx)), min(size, int(cx + rx) + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    mask[y0:y1, x0:x1][inside] = label


def make_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Background 0, large regions 1, small discs 2, a rare class 3 in a third of the masks."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        _ellipse(mask, rng, 1, (size / 8, size / 3))
    for _ in range(rng.integers(2, 12)):
        _ellipse(mask, rng, 2, (size / 64, size / 20))
    if rng.random() < 1 / 3:
        _ellipse(mask, rng, 3, (size / 60, size / 25))
    # A pixel whose right or lower neighbour has another class is ambiguous: ignore it.
    border = np.zeros_like(mask, dtype=bool)
    border[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    border[:-1, :] |= mask[:-1, :] != mask[1:, :]
    mask[border] = IGNORE_INDEX
    return mask


def ensure_masks(root: Path, count: int, size: int, seed: int) -> None:
    meta = {"count": count, "size": size, "seed": seed}
    meta_path = root / META_FILE
    masks = root / "masks"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta and len(list(masks.glob("*.png"))) == count:
        return
    print(f"writing {count} masks of {size}x{size} to {masks} (once) ...", file=sys.stderr, flush=True)
    masks.mkdir(parents=True, exist_ok=True)
    for old in masks.glob("*.png"):
        old.unlink()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(make_mask(rng, size)).save(masks / f"{i:05d}.png")
    meta_path.write_text(json.dumps(meta) + "\n")


def time_pass(source: MaskFiles, num_workers: int) -> tuple[float, dict]:
    start = time.perf_counter()
    stats = compute_class_stats(source, NUM_CLASSES, IGNORE_INDEX, num_workers=num_workers, cache=False)
    return time.perf_counter() - start, stats.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/bench_stats_masks"))
    parser.add_argument("--count", type=int, default=2000, help="number of masks")
    parser.add_argument("--size", type=int, default=512, help="pixels per side")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="first one is the reference")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per worker count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ensure_masks(args.root, args.count, args.size, args.seed)
    source = MaskFiles(args.root)
    for path in source.mask_paths:  # page cache warm for every measured pass alike
        path.read_bytes()

    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    results = []
    for _ in range(args.repeats):
        for workers in args.workers:
            elapsed, stats = time_pass(source, workers)
            seconds[workers].append(elapsed)
            results.append(stats)
            print(f"  num_workers={workers}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    if any(r != results[0] for r in results):
        raise SystemExit("the passes disagree on the counts; the benchmark measures a broken pass")

    speed = {w: args.count / statistics.median(s) for w, s in seconds.items()}
    reference = args.workers[0]
    share = np.array(results[0]["pixel_count"]) / results[0]["total_pixels"]
    print(f"{args.count} masks of {args.size}x{args.size} (uint8 index PNGs; class shares "
          f"{', '.join(f'{100 * x:.2f}%' for x in share)}; ignore band at borders), cache off, "
          f"median of {args.repeats} interleaved passes, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| num_workers | masks/s | ratio to reference |\n|---|---|---|")
    for workers in args.workers:
        name = f"{workers} (reference)" if workers == reference else str(workers)
        print(f"| {name} | {speed[workers]:.0f} | {speed[workers] / speed[reference]:.2f}x |")
    print(f"\ncommand: .venv/bin/python scripts/bench_stats.py {shlex.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
