"""Throughput of the class-statistics pass (decode and count every training mask) by processes reading.

The pass is ``segtrain.data.scan_ranks.class_counts_over_ranks`` with the cache off (what
training runs, under DDP and without), reading index PNGs with the training code's
``read_mask``. Four configurations on the same masks: one process (the reference), one process
with loader workers, and ranks of a gloo group (a file store, sockets on the loopback) without
and with loader workers each. The ranks are started once per round and timed from a barrier
to the end of the pass (the collective included, start-up and group set-up excluded: in
training the ranks already exist); their loader workers are forked, as in a rank that torchrun
starts. Rounds run the configurations in turn, so that a slow phase of a shared machine hits
all of them alike; each is reported as the median of its rounds and as a ratio to the
reference measured in the same invocation. Every pass must give the reference's matrix.

The masks are generated once under ``--root`` (512x512 uint8, four classes of very different
sizes and a one-pixel ignore band at every border) and reused by later runs.

    python scripts/bench_stats.py                          # 2000 masks, 3 rounds, 2 ranks, 2 workers
    python scripts/bench_stats.py --root /tmp/bench_stats_400 --count 400 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.data.folder import read_mask
from segtrain.data.scan_ranks import class_counts_over_ranks

NUM_CLASSES = 4
IGNORE_INDEX = 255
META_FILE = "bench_stats.json"
WARM_UP = 16  # masks of the untimed first pass of every process


class MaskFiles:
    """A mask source for the class-count pass: the PNGs under ``<root>/masks``."""

    def __init__(self, root: Path, limit: int | None = None) -> None:
        self.root = root
        self.mask_paths = sorted((root / "masks").glob("*.png"))[:limit]
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


def _digest(counts: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(counts, dtype=np.int64).tobytes()).hexdigest()


def time_pass(source: MaskFiles, num_workers: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    counts = class_counts_over_ranks(source, NUM_CLASSES, IGNORE_INDEX, num_workers=num_workers, cache=False)
    return time.perf_counter() - start, counts


def _rank_main(rank: int, world: int, store: str, root: str, worker_counts: list[int], result: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    multiprocessing.set_start_method("fork", force=True)  # loader workers as in a torchrun rank
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        source, timings = MaskFiles(Path(root)), {}
        time_pass(MaskFiles(Path(root), WARM_UP), 0)  # untimed: first-call costs (lazy imports, allocations)
        for workers in worker_counts:
            dist.barrier()  # every rank starts together; the pass's all-reduce ends it together
            elapsed, counts = time_pass(source, workers)
            timings[workers] = elapsed, _digest(counts)
        if rank == 0:
            Path(result).write_text(json.dumps(timings))
    finally:
        dist.destroy_process_group()


def time_ranks(root: Path, world: int, worker_counts: list[int]) -> dict[int, tuple[float, str]]:
    """{workers: (seconds, digest)} of one group of ``world`` ranks that runs the pass once per worker count."""
    with tempfile.TemporaryDirectory(prefix="bench_stats_") as tmp:
        result = Path(tmp) / "result.json"
        mp.start_processes(_rank_main, args=(world, str(Path(tmp) / "store"), str(root), worker_counts, str(result)),
                           nprocs=world, start_method="spawn")
        return {int(w): tuple(v) for w, v in json.loads(result.read_text()).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/bench_stats_masks"))
    parser.add_argument("--count", type=int, default=2000, help="number of masks")
    parser.add_argument("--size", type=int, default=512, help="pixels per side")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the distributed configurations")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per process where there are any")
    parser.add_argument("--repeats", type=int, default=3, help="rounds: timed passes per configuration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ensure_masks(args.root, args.count, args.size, args.seed)
    source = MaskFiles(args.root)
    for path in source.mask_paths:  # page cache warm for every measured pass alike
        path.read_bytes()
    time_pass(MaskFiles(args.root, WARM_UP), 0)  # untimed, as in each group of ranks

    configs = [(1, 0), (1, args.workers), (args.ranks, 0), (args.ranks, args.workers)]
    seconds: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    digests, counts = set(), None
    for _ in range(args.repeats):
        for workers in (0, args.workers):
            elapsed, counts = time_pass(source, workers)
            seconds[1, workers].append(elapsed)
            digests.add(_digest(counts))
        for workers, (elapsed, digest) in time_ranks(args.root, args.ranks, [0, args.workers]).items():
            seconds[args.ranks, workers].append(elapsed)
            digests.add(digest)
        print("  " + ", ".join(f"{r} process(es) x {w} workers: {s[-1]:.2f} s" for (r, w), s in seconds.items()),
              file=sys.stderr, flush=True)
    if len(digests) != 1:
        raise SystemExit("the passes disagree on the counts; the benchmark measures a broken pass")

    speed = {c: args.count / statistics.median(s) for c, s in seconds.items()}
    share = counts.sum(axis=0) / counts.sum()
    print(f"{args.count} masks of {args.size}x{args.size} (uint8 index PNGs; class shares "
          f"{', '.join(f'{100 * x:.2f}%' for x in share)}; ignore band at borders), cache off, "
          f"median of {args.repeats} rounds, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| configuration | processes reading | masks/s | ratio to 1 process |\n|---|---|---|---|")
    for ranks, workers in configs:
        name = ("1 process" if ranks == 1 else f"{ranks} ranks") + (f" x {workers} workers" if workers else "")
        readers = ranks * max(workers, 1)
        print(f"| {name}{' (reference)' if (ranks, workers) == configs[0] else ''} | {readers} | "
              f"{speed[ranks, workers]:.0f} | {speed[ranks, workers] / speed[configs[0]]:.2f}x |")
    print(f"\ncommand: .venv/bin/python scripts/bench_stats.py {shlex.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
