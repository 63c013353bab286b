"""segtrain's UNet and DeepLabV3+ on timm encoders against segmentation_models_pytorch's on the same encoders.

For each encoder: ``UNet(encoder="timm:<name>")`` against smp's ``Unet("tu-<name>")`` and ``DeepLabV3Plus(encoder=
"timm:<name>", output_stride=16)`` against smp's ``DeepLabV3Plus("tu-<name>", encoder_output_stride=16)``, both with
random weights and the same decoders (UNet 256-128-64-32-16; DeepLabV3+ 256 channels with depthwise-separable
ASPP and decoder convs, smp's default, ``separable=True`` in segtrain: the parameter counts agree). One
training step each (forward, cross-entropy, backward; ``bench_models.py``'s round-robin timing and profiler memory),
and the ratio segtrain / smp per pair, measured in the same run. smp is a benchmark-only dependency
(``pip install -e '.[bench]'``), not one of segtrain's.

    python scripts/bench_timm.py                                   # 512x512, batch 4, 2 threads, 3 encoders
    python scripts/bench_timm.py --encoders resnet18 --size 256 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_models.py, before torch starts OpenMP

import torch  # noqa: E402

import segtrain  # noqa: F401, E402, I001  (makes torchvision importable; must precede it and timm)
import bench_models  # noqa: E402
from bench_models import Bench, describe_machine, run_cpu  # noqa: E402
from segtrain.models import DeepLabV3Plus, UNet  # noqa: E402

DEFAULT_ENCODERS = ("resnet18", "efficientnet_b0", "convnext_tiny")


def benches(encoder: str, num_classes: int) -> list[tuple[Bench, Bench]]:
    """(segtrain's, smp's) for the UNet and the DeepLabV3+ (output stride 16) on ``encoder``."""
    import segmentation_models_pytorch as smp

    return [
        (Bench(f"segtrain UNet timm:{encoder}", lambda: UNet(num_classes, encoder=f"timm:{encoder}")),
         Bench(f"smp Unet tu-{encoder}", lambda: smp.Unet(f"tu-{encoder}", encoder_weights=None, classes=num_classes))),
        (Bench(f"segtrain DeepLabV3+ timm:{encoder} os16",
               lambda: DeepLabV3Plus(num_classes, encoder=f"timm:{encoder}", output_stride=16, separable=True)),
         Bench(f"smp DeepLabV3Plus tu-{encoder} os16",
               lambda: smp.DeepLabV3Plus(f"tu-{encoder}", encoder_weights=None, classes=num_classes,
                                         encoder_output_stride=16))),
    ]


def _no_flops(bench: Bench, size: int) -> float:
    # bench_models counts FLOPs on a batch of one, which smp's DeepLabV3+ cannot take in train mode (its image
    # pooling BatchNorm); this table compares time and memory only.
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=list(DEFAULT_ENCODERS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds; the first measures memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=3)
    args = parser.parse_args(argv)
    args.no_memory, args.device = False, "cpu"
    torch.set_num_threads(args.threads)
    bench_models.forward_gflops = _no_flops
    pairs = [pair for encoder in args.encoders for pair in benches(encoder, args.num_classes)]
    rows = {row["name"]: row for row in run_cpu([bench for pair in pairs for bench in pair], args)}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n`{shlex.join(['python', 'scripts/bench_timm.py', *sys.argv[1:]])}`\n")
    print(f"{date}, {describe_machine(args)}, torch {torch.__version__}; train mode, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.warmup} warm-up + {args.repeats} timed steps, round-robin\n")
    print("| model | params (M) | wall s/img, median (min-max) | CPU s/img | peak extra memory (MiB) "
          "| segtrain / smp: wall | CPU | memory |")
    print("|---|---|---|---|---|---|---|---|")
    for ours, theirs in pairs:
        a, b = rows[ours.name], rows[theirs.name]
        for r, ratios in ((a, (a["wall"] / b["wall"], a["cpu"] / b["cpu"], a["memory"] / b["memory"])), (b, None)):
            ratio = " | ".join(f"{x:.2f}x" for x in ratios) if ratios else "  |  | "
            print(f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['wall']:.3f} ({r['low']:.3f}-{r['high']:.3f}) | "
                  f"{r['cpu']:.3f} | {r['memory']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
