"""Throughput of the training input pipeline: decode + augment + collate, in images/s.

segtrain's pipeline (``FolderDataset`` + the albumentations train preset + ``pad_collate``,
drawn by ``EpochSampler``) against the same steps written with torchvision.transforms.v2
(tv_tensors Image/Mask; RandomResize, RandomCrop with padding, RandomHorizontalFlip,
ToDtype, Normalize), with the same parameters, the same decoding (PIL) and the same
DataLoader, for each worker count. The data: ``--count`` synthetic RGB JPEGs with index-PNG
masks of ``--size`` px a side, written once under ``--root`` (a temporary directory by default).

Every loader is kept alive (persistent workers) and warmed up with one epoch; then the
configurations take turns, one epoch each, ``--repeats`` times, so that a slow phase of a
shared machine hits all of them alike. Reported: the median epoch throughput and its ratio to
torchvision with the same number of workers, measured in the same run. Each process (the
main one and every worker) runs torch and OpenCV on ``--threads`` threads (default 1).

    python scripts/bench_data.py                       # 64 images of 512x512, 0/1/2 workers
    python scripts/bench_data.py --count 32 --repeats 3 --workers 0 2
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.data import EpochSampler, FolderDataset, pad_collate, train_transform
from segtrain.data.folder import read_image, read_mask
from segtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
SCALE_RANGE = (0.5, 2.0)


def write_data(root: Path, count: int, size: int) -> None:
    """Smooth colour fields with a few ellipses of 4 classes; JPEG images, PNG masks."""
    image_dir, mask_dir = root / "images" / "train", root / "masks" / "train"
    if image_dir.is_dir() and len(list(image_dir.glob("*.jpg"))) == count:
        return
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        rng = np.random.default_rng(i)
        image = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + c) * 0.3 + 0.5 for c in range(3)], -1)
        mask = np.zeros((size, size), np.uint8)
        for label in (1, 1, 2, 3):
            cy, cx, ry, rx = rng.uniform(0.1, 0.9, 2).tolist() + rng.uniform(0.03, 0.25, 2).tolist()
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            mask[inside] = label
            image[inside] = rng.uniform(0, 1, 3)
        image += rng.normal(0, 0.04, image.shape)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(image_dir / f"{i:04d}.jpg", quality=90)
        Image.fromarray(mask).save(mask_dir / f"{i:04d}.png")


class TorchvisionPairs(torch.utils.data.Dataset):
    """The same files and decoding as FolderDataset, augmented with torchvision.transforms.v2."""

    def __init__(self, folder: FolderDataset, crop: int) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.folder, self.tv_tensors = folder, tv_tensors
        self.transform = v2.Compose([
            # Shorter side drawn in [0.5, 2) x crop: RandomScale's range on these square images.
            v2.RandomResize(int(SCALE_RANGE[0] * crop), int(SCALE_RANGE[1] * crop), antialias=False),
            v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image = read_image(self.folder.image_paths[index])
        mask = read_mask(self.folder.mask_paths[index]).astype(np.uint8)
        image = self.tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        image, mask = self.transform(image, self.tv_tensors.Mask(torch.from_numpy(mask)))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def _collate(batch):
    return pad_collate(batch, IGNORE_INDEX)


def _limit_threads(threads: int) -> None:
    # The same in the main process and in every worker (DataLoader sets only torch's, to 1), so
    # that worker counts compare like with like and OpenCV does not oversubscribe the cores.
    import cv2

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


def make_loaders(root: Path, crop: int, batch: int, worker_counts: list[int],
                 threads: int) -> dict[tuple[str, int], object]:
    transform = train_transform(ignore_index=IGNORE_INDEX, hflip=True, scale_range=SCALE_RANGE, crop_size=crop)
    ours = FolderDataset(root, "train", num_classes=4, ignore_index=IGNORE_INDEX, transform=transform)
    theirs = TorchvisionPairs(FolderDataset(root, "train", num_classes=4), crop)
    loaders = {}
    for workers in worker_counts:
        common = dict(batch_size=batch, num_workers=workers, collate_fn=_collate, drop_last=True,
                      persistent_workers=workers > 0,
                      worker_init_fn=functools.partial(_init_worker, threads=threads) if workers else None)
        sampler = EpochSampler(len(ours), seed=0, drop_last_batch_of=batch)
        loaders["albumentations (segtrain)", workers] = (torch.utils.data.DataLoader(ours, sampler=sampler, **common),
                                                         sampler)
        gen = torch.Generator().manual_seed(0)
        loaders["torchvision v2", workers] = (torch.utils.data.DataLoader(theirs, shuffle=True, generator=gen,
                                                                          **common), None)
    return loaders


def _init_worker(worker_id: int, threads: int) -> None:
    _limit_threads(threads)


def epoch_throughput(loader, sampler, epoch: int) -> float:
    if sampler is not None:
        sampler.set_epoch(epoch)
    start, images = time.perf_counter(), 0
    for x, y in loader:
        images += x.shape[0]
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "segtrain-bench-data")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="image side and crop size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads in every process")
    args = parser.parse_args(argv)
    _limit_threads(args.threads)
    write_data(args.root, args.count, args.size)
    loaders = make_loaders(args.root, args.size, args.batch, args.workers, args.threads)
    speeds: dict[tuple[str, int], list[float]] = {key: [] for key in loaders}
    for key, (loader, sampler) in loaders.items():  # warm-up: worker start, first decodes, caches
        epoch_throughput(loader, sampler, 0)
    for rep in range(args.repeats):
        for key, (loader, sampler) in loaders.items():
            speeds[key].append(epoch_throughput(loader, sampler, rep + 1))

    import albumentations
    import torchvision

    print("command:", shlex.join(["python", "scripts/bench_data.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"{args.count} JPEG+PNG pairs of {args.size}x{args.size}, crop {args.size}, scale {SCALE_RANGE}, hflip, "
          f"normalise, batch {args.batch}; median of {args.repeats} epochs after one warm-up epoch; "
          f"{args.threads} torch/OpenCV thread(s) per process; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, albumentations {albumentations.__version__}")
    print()
    print("| pipeline | workers | images/s | vs torchvision v2 |")
    print("|---|---:|---:|---:|")
    for workers in args.workers:
        reference = statistics.median(speeds["torchvision v2", workers])
        for name in ("albumentations (segtrain)", "torchvision v2"):
            median = statistics.median(speeds[name, workers])
            print(f"| {name} | {workers} | {median:.1f} | {median / reference:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
