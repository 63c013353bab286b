"""What decoding every image costs the dataset pass, against reading its header only.

The pass (``segtrain.data.scan.scan_pair``) decodes each mask and now each image as well (``check_image``: a
truncated or changed image stops before the first step, not mid-training; a JPEG decodes at 1/8 scale). The
reference is the same pass with the image's header read instead (what the pass did before). Pairs of 512x512
images (PNG or JPEG) and index-PNG masks are written once under ``--root``; the two settings run in turn
(reference, checked, reference, ...) and each is reported as the median of its runs.

    python scripts/bench_pair_check.py                       # 300 pairs per image format, 3 runs each
    python scripts/bench_pair_check.py --count 100 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.data import scan
from segtrain.data.folder import FolderDataset


def header_only(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def write_pairs(root: Path, suffix: str, count: int, size: int) -> None:
    images, masks = root / "images/train", root / "masks/train"
    if images.is_dir() and len(list(images.iterdir())) == count:
        return
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        # Smooth colour fields with noise: compresses like a photograph, not like random bytes.
        base = rng.uniform(40, 200, 3)
        wave = np.sin(xx[..., None] / rng.uniform(8, 40) + rng.uniform(0, 6, 3))
        image = base + 40 * wave + rng.normal(0, 8, (size, size, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(images / f"{i:05d}{suffix}", quality=90)
        Image.fromarray(((xx // 64 + yy // 64 + i) % 3).astype(np.uint8)).save(masks / f"{i:05d}.png")


def one_pass(dataset: FolderDataset) -> float:
    start = time.perf_counter()
    for index in range(len(dataset)):
        assert not scan.scan_pair(dataset, index, 3, 255).problems
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/bench_pair_check"))
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checked = scan.check_image
    print(f"{args.count} pairs of {args.size}x{args.size}, median of {args.repeats} passes each\n")
    print("| images | header only (reference), pairs/s | decoded (check_image), pairs/s | ratio of time |")
    print("|---|---|---|---|")
    for suffix in (".png", ".jpg"):
        root = args.root / suffix[1:]
        write_pairs(root, suffix, args.count, args.size)
        dataset = FolderDataset(root, "train", num_classes=3)
        times = {"header": [], "decoded": []}
        for _ in range(args.repeats):
            for name, reader in (("header", header_only), ("decoded", checked)):
                scan.check_image = reader
                times[name].append(one_pass(dataset))
        scan.check_image = checked
        header, decoded = (statistics.median(times[k]) for k in ("header", "decoded"))
        print(f"| {suffix[1:].upper()} | {args.count / header:.0f} | {args.count / decoded:.0f} | "
              f"{decoded / header:.2f}x |")


if __name__ == "__main__":
    main()
