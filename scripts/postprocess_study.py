"""Per-class post-processing rules on planted speckle: tuned on one split, scored on another; a markdown table.

Truth: class-1 rectangles and class-2 discs (the rare class) on background 0. The prediction is the truth plus
false class-2 islands of 1-6 pixels on the background and holes of 1-4 pixels (predicted 0) inside class 1, drawn
by a seeded numpy generator; each pixel's second class is its truth where something was planted, else 0.
``segtrain.analysis.postprocess.tune`` fits the rules on ``--tune-images`` images of seed 0, and the table shows
precision / recall / Dice per class on ``--held-out-images`` images of seed 1, before and after ``apply``.

    .venv/bin/python scripts/postprocess_study.py
    .venv/bin/python scripts/postprocess_study.py --size 256 --tune-images 100 --held-out-images 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.analysis.postprocess import PostProcess, apply, report_table, tune
from segtrain.metrics import class_scores

NAMES = ["background", "slab", "spot"]


def _free(grid: np.ndarray, y: int, x: int, h: int, w: int, margin: int, value: int) -> bool:
    """Whether the box (y, x, h, w) grown by ``margin`` lies inside the image and holds only ``value``."""
    size = grid.shape[0]
    if y - margin < 0 or x - margin < 0 or y + h + margin > size or x + w + margin > size:
        return False
    return bool((grid[y - margin:y + h + margin, x - margin:x + w + margin] == value).all())


def planted_image(rng: np.random.Generator, size: int, islands: int, holes: int, island_second: int | None = None,
                  islands_true: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (labels, second, truth) sample; ``island_second``: the islands' second class instead of their truth,
    ``islands_true``: the islands are class-2 objects of the truth too."""
    truth = np.zeros((size, size), np.int64)
    for _ in range(rng.integers(1, 3)):  # class 1: one or two rectangles of side size/4 .. size/2
        h, w = rng.integers(size // 4, size // 2, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        truth[y:y + h, x:x + w] = 1
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(1, 3)):  # class 2: one or two discs of radius 3-5, clear of class 1
        for _ in range(100):
            r, cy, cx = rng.integers(3, 6), *rng.integers(6, size - 6, 2)
            if _free(truth, cy - r, cx - r, 2 * r + 1, 2 * r + 1, 3, 0):
                truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
                break
    labels, second = truth.copy(), np.zeros_like(truth)
    placed = 0
    for _ in range(islands * 20):  # false class-2 islands of 1x1 .. 2x3 pixels on the background
        if placed == islands:
            break
        h, w, y, x = rng.integers(1, 3), rng.integers(1, 4), *rng.integers(0, size, 2)
        if _free(labels, y, x, h, w, 2, 0):
            labels[y:y + h, x:x + w] = 2
            second[y:y + h, x:x + w] = 0 if island_second is None else island_second
            if islands_true:
                truth[y:y + h, x:x + w] = 2
            placed += 1
    placed = 0
    for _ in range(holes * 20):  # holes of 1x1 .. 2x2 pixels inside class 1
        if placed == holes:
            break
        h, w, y, x = *rng.integers(1, 3, 2), *rng.integers(0, size, 2)
        if _free(labels, y, x, h, w, 2, 1):
            labels[y:y + h, x:x + w] = 0
            second[y:y + h, x:x + w] = 1
            placed += 1
    return labels, second, truth


def planted_split(seed: int, images: int, size: int = 128, islands: int = 12, holes: int = 6,
                  **options) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``images`` samples of ``planted_image`` from one numpy generator seeded ``seed``."""
    rng = np.random.default_rng(seed)
    return [planted_image(rng, size, islands, holes, **options) for _ in range(images)]


def split_matrix(samples: list, num_classes: int, pp: PostProcess | None = None) -> torch.Tensor:
    """(K, K) confusion matrix of the split's predictions (post-processed by ``pp`` when given), rows = truth."""
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for labels, second, truth in samples:
        pred = labels if pp is None else apply(labels, second, pp)
        index = torch.from_numpy(truth * num_classes + pred).flatten()
        total += torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return total


def markdown(before: torch.Tensor, after: torch.Tensor) -> str:
    b, a = class_scores(before), class_scores(after)
    rows = ["| class | precision | recall | Dice |", "|---|---|---|---|"]
    for c, name in enumerate(NAMES):
        cells = [f"{float(b[m][c]):.4f} -> {float(a[m][c]):.4f}" for m in ("precision", "recall", "dice")]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tune-images", type=int, default=60)
    parser.add_argument("--held-out-images", type=int, default=60)
    args = parser.parse_args()
    tuning, held_out = planted_split(0, args.tune_images, args.size), planted_split(1, args.held_out_images, args.size)
    start = time.perf_counter()
    pp, candidates = tune(tuning, len(NAMES))
    seconds = time.perf_counter() - start
    print(f"tuned on {args.tune_images} images {args.size}x{args.size} (seed 0) in {seconds:.2f} s, "
          f"{len(candidates)} candidates; held out: {args.held_out_images} images (seed 1)\n")
    print("accepted rules:", pp.to_dict(NAMES), "\n")
    print(markdown(split_matrix(held_out, len(NAMES)), split_matrix(held_out, len(NAMES), pp)))
    print("\nOn the tuning split (the tuning objective, Dice):\n")
    print(report_table(candidates, NAMES))


if __name__ == "__main__":
    main()
