"""Training-loader throughput from tar shards against the folder layout of the same images, as a ratio in the same run.

The synthetic dataset (``--images`` train images of ``--size`` px) is written once as a folder and once as shards
(``python -m segtrain.shard``, ``--per-shard`` samples each); the loaders are the ones training builds
(``build_data``, ``build_loaders``: decoding, augmentation, collation), read for one whole epoch per repeat with
0 and ``--workers`` loader workers. The shards are on the same local disk as the folder (page cache warm after the
first repeat), so this measures what reading tars in order costs or saves against opening one file per image, not
a network store.

    python scripts/bench_shards.py
    python scripts/bench_shards.py --images 800 --size 256 --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import segtrain  # noqa: F401
from segtrain.build import build_data, build_loaders
from segtrain.config import compose_config
from segtrain.data import ensure_synthetic
from segtrain.shard import write_shards


def _epoch_seconds(overrides: list[str], repeats: int) -> float:
    cfg = compose_config(overrides)
    data = build_data(cfg.dataset)
    loader, _, _ = build_loaders(data, cfg, torch.device("cpu"))
    times = []
    for epoch in range(repeats + 1):  # the first epoch warms the page cache up
        source = loader.dataset if hasattr(loader.dataset, "set_epoch") else loader.sampler
        source.set_epoch(epoch)
        start = time.perf_counter()
        images = sum(batch[0].shape[0] for batch in loader)
        times.append((time.perf_counter() - start) / images)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate = [f"dataset.generate.num_train={args.images}", "dataset.generate.num_val=4",
                    f"dataset.generate.size={args.size}"]
        ensure_synthetic(root, num_train=args.images, num_val=4, size=args.size, seed=0)
        folder = ["debug=fast", f"dataset.root={root}", *generate, "trainer.batch_size=8"]
        cfg = compose_config(folder)
        write_shards(cfg, Path(tmp) / "shards", [cfg.dataset.train_split, cfg.dataset.val_split], args.per_shard,
                     2**30)
        shards = ["debug=fast", "dataset=shards", f"dataset.root={Path(tmp) / 'shards'}", "trainer.batch_size=8"]
        print(f"{args.images} train images of {args.size}x{args.size} px, shards of {args.per_shard}, batch 8, "
              f"torch {torch.__version__}, median of {args.repeats} epochs")
        print("| loader workers | folder (images/s) | shards (images/s) | shards / folder |\n|---|---|---|---|")
        for workers in (0, args.workers):
            per = [f"trainer.num_workers={workers}"]
            a, b = _epoch_seconds(folder + per, args.repeats), _epoch_seconds(shards + per, args.repeats)
            print(f"| {workers} | {1 / a:.1f} | {1 / b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
