"""Sliding-window prediction against MONAI's ``sliding_window_inference``, by image size.

Both run the same model on the same windows (tile, overlap, windows per batch, Gaussian blend
with sigma = tile / 8) of one random image per size, segtrain's as ``segtrain.inference.
predict_probs`` (probabilities out), MONAI's with the same softmax as its predictor. Reported
per size: seconds, time per image megapixel and per processed megapixel (windows x tile area:
the work the model does, which the window grid makes grow faster than the image at small
sizes), both as a ratio to MONAI's in the same run, and the peak memory each allocates beyond
the image, against the float32 (K, H, W) output buffer: what is left after the model's own
peak on one batch of windows (measured alone) is the blending's full-size memory.

    python scripts/bench_predict.py                          # 1024, 2048, 4096 on CPU
    python scripts/bench_predict.py --sizes 1024 --encoder resnet18 --base-width 32
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch
from benchmem import check_cpu_memory_method, peak_cpu_bytes, peak_cuda_bytes

import segtrain  # noqa: F401
from segtrain.inference import InferenceOptions, predict_probs, window_starts
from segtrain.models import UNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--encoder", default=None, help="UNet encoder (default: the encoder-free UNet)")
    parser.add_argument("--base-width", type=int, default=8, help="encoder-free UNet's first width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        check_cpu_memory_method()
    peak = peak_cuda_bytes if device.type == "cuda" else peak_cpu_bytes
    torch.manual_seed(0)
    model = UNet(num_classes=args.classes, encoder=args.encoder, base_width=args.base_width).eval().to(device)
    tile = (args.tile, args.tile)
    options = InferenceOptions(mode="slide", tile=tile, overlap=args.overlap, batch_size=args.batch)

    def ours(image):
        return predict_probs(model, image, options)

    @torch.no_grad()
    def monai(image):
        return sliding_window_inference(image[None], tile, args.batch, lambda x: model(x).softmax(1),
                                        overlap=args.overlap, mode="gaussian", sigma_scale=0.125)[0]

    batch = torch.randn(args.batch, 3, *tile, device=device)
    with torch.no_grad():
        model(batch)  # warm-up
        model_peak = peak(lambda: model(batch).softmax(1))
    print(f"`python scripts/bench_predict.py {shlex.join(sys.argv[1:])}`\n")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, UNet "
          f"({args.encoder or f'no encoder, base width {args.base_width}'}), {args.classes} classes, tile {args.tile}, "
          f"overlap {args.overlap}, {args.batch} windows per batch, gaussian; one batch of windows alone: "
          f"{model_peak / 2**20:.0f} MiB" + (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg")
                                               else "") + "\n")
    print("| size | windows | ours s | MONAI s | time / MONAI | ours s per image MP | ours s per processed MP "
          "| output buffer MiB | ours peak MiB | MONAI peak MiB | (ours peak - batch) / buffer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
        windows = len(window_starts(size, args.tile, args.overlap)) ** 2
        ours(image[:, : args.tile * 2, : args.tile * 2])  # warm-up at this batch shape
        t_monai = _timed(lambda: monai(image), device)
        t_ours = _timed(lambda: ours(image), device)
        m_ours, m_monai = peak(lambda: ours(image)), peak(lambda: monai(image))
        buffer = args.classes * size * size * 4
        print(f"| {size}x{size} | {windows} | {t_ours:.1f} | {t_monai:.1f} | {t_ours / t_monai:.2f}x "
              f"| {t_ours / (size * size / 1e6):.2f} | {t_ours / (windows * args.tile ** 2 / 1e6):.2f} "
              f"| {buffer / 2**20:.0f} | {m_ours / 2**20:.0f} | {m_monai / 2**20:.0f} "
              f"| {(m_ours - model_peak) / buffer:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
