"""What the per-image report adds to ``python -m segtrain.evaluate``: seconds and megabytes, against the evaluation.

One checkpoint (the default UNet-R18, ``--steps`` steps on 128x128 crops) is scored on a folder dataset of road-scene
size: ``--images`` val images of 480x360 (crops of scikit-learn's two sample photos, so that the galleries compress
as photographs do) with 11 classes read off the photos' colours (``_mask``): the model gets them partly right, each
class failing on images of its own, so that the worst images of the 11 classes are many different ones, as on
real data, and every class gets a full gallery. ``evaluate_checkpoint`` runs without the report (the
reference: the evaluation alone) and with it (per-image matrices, per_image.csv, report.md and the galleries), in
alternating rounds so that a slow phase of a shared machine hits both alike; the first round warms up and is
dropped, each variant is the median of the others. The report folder's size is read after the last round.

Measures whatever ``segtrain`` is importable, so the code before a change runs the same script from a checkout:

    python scripts/bench_report.py --rounds 3
    git worktree add /tmp/wt_before HEAD && PYTHONPATH=/tmp/wt_before python scripts/bench_report.py --rounds 3
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_image

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.config import compose_config
from segtrain.evaluate import evaluate_checkpoint
from segtrain.train import train

NUM_CLASSES, HEIGHT, WIDTH, SEEDS = 11, 360, 480, 40


def _mask(photo: np.ndarray) -> np.ndarray:
    """11 classes read off the blurred photograph (six hues where it is colourful, five grey levels elsewhere), so
    that a few training steps give a model that segments them imperfectly, each class failing on its own images;
    a one-pixel ignore band at every border between classes."""
    hsv = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(4)).convert("HSV"), dtype=np.int64)
    hue, saturation, value = hsv[..., 0] * 6 // 256, hsv[..., 1], hsv[..., 2] * 5 // 256
    mask = np.where(saturation > 60, hue, 6 + value).astype(np.uint8)  # (H, W) in 0..10
    border = np.zeros(mask.shape, dtype=bool)
    border[1:] |= mask[1:] != mask[:-1]
    border[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    mask[border] = 255
    return mask


def make_dataset(root: Path, num_val: int, num_train: int = 16) -> None:
    """images/<split>/*.png, masks/<split>/*.png under ``root``, once."""
    if (root / "masks/val" / f"{num_val - 1:04d}.png").is_file():
        return
    rng = np.random.default_rng(0)
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    for split, count in (("train", num_train), ("val", num_val)):
        for folder in ("images", "masks"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            photo = photos[i % 2]
            top, left = rng.integers(0, photo.shape[0] - HEIGHT), rng.integers(0, photo.shape[1] - WIDTH)
            crop = photo[top : top + HEIGHT, left : left + WIDTH]
            Image.fromarray(crop).save(root / "images" / split / f"{i:04d}.png")
            Image.fromarray(_mask(crop)).save(root / "masks" / split / f"{i:04d}.png")


def _folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_report"))
    parser.add_argument("--steps", type=int, default=150, help="training steps of the checkpoint")
    args = parser.parse_args(argv)
    data, run = args.root / "data", args.root / "run"  # one checkpoint for every checkout measured
    make_dataset(data, args.images)
    common = ["dataset=folder", f"dataset.root={data}", f"dataset.num_classes={NUM_CLASSES}", "trainer.device=cpu",
              "trainer.amp=none", "trainer.num_workers=0", "dataset.batch_size_val=4"]
    checkpoint = run / "checkpoints/last.pt"
    if not checkpoint.is_file():  # a few steps on 128x128 crops; its own validation on the 16 training images
        overrides = [*common, f"trainer.max_steps={args.steps}", "trainer.epochs=1000", "trainer.eval_every=1000",
                     "trainer.batch_size=8", "trainer.progress=false", "trainer.min_steps_warning=0",
                     "dataset.val_split=train", "dataset.augment.crop_size=128"]
        train(compose_config(overrides), run, overrides=overrides)
    scored = [*common, "dataset.split=val"]
    variants = {"evaluation alone": (scored, False), "with the report": ([*scored, f"report.dir={args.root}/r"], True)}
    if "galleries" in compose_config([]).report:  # a checkout before report.galleries has no such variant
        variants["report, no galleries"] = ([*scored, f"report.dir={args.root}/r0", "report.galleries=false"], True)
    for name in ("r", "r0"):  # a report of another checkout's run would be counted with this one's
        shutil.rmtree(args.root / name, ignore_errors=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds + 1):
        for name, (overrides, report) in variants.items():
            start = time.perf_counter()
            evaluate_checkpoint(checkpoint, overrides, report=report)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(f"$ python scripts/bench_report.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"segtrain from {Path(segtrain.__file__).parent}; {args.images} val images of {WIDTH}x{HEIGHT}, "
          f"{NUM_CLASSES} classes, UNet (resnet18) on cpu, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print("| variant | seconds | time added | report folder |\n|---|---|---|---|")
    for name, seconds in medians.items():
        folder = next((Path(o.split("=", 1)[1]) for o in variants[name][0] if o.startswith("report.dir=")), None)
        size, count = _folder_size(folder) if folder is not None else (0, 0)
        added = f"{100 * (seconds / medians['evaluation alone'] - 1):+.1f}%" if folder is not None else "reference"
        where = f"{size / 1e6:.2f} MB in {count} files" if folder is not None else "-"
        print(f"| {name} | {seconds:.2f} | {added} | {where} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
