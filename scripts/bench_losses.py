"""Forward + backward time and peak extra memory of every multiclass loss, as ratios to cross-entropy.

The reference is a plain ``F.cross_entropy(logits, target, ignore_index=255)`` measured in the
same run, so the machine's noise cancels out of the ratios. Inputs: random logits (a leaf that
requires grad) and a blocky, class-imbalanced target with ~5% ignored pixels; ``focal_dice``
and ``ce_dice`` are built as training builds them, ``build_loss(OmegaConf.load(...),
class_weights, ...)`` with median-frequency weights of the target (configs/weights/median_freq.yaml).
MONAI's DiceFocalLoss and DiceCELoss, when installed, are peers for scale; they get no
``ignore_index``, so their target (prepared outside the timing) has the last class at ignored pixels.

    python scripts/bench_losses.py                          # CPU, 2 threads, both shapes
    python scripts/bench_losses.py --shapes 8,3,512,512 --reps 9 --only focal_dice ce_dice
    python scripts/bench_losses.py 2>/dev/null              # hides the profiler's start/stop log lines

Method
- time: per case, the median over ``--reps`` repetitions of one forward + backward (``.grad``
  cleared before each); repetitions are interleaved over the cases (case order rotates every
  repetition) so that a slow spell of the shared machine hits every case alike. Warm-up first.
- peak extra memory, CPU: one forward + backward under ``torch.profiler.profile(activities=[CPU],
  profile_memory=True)``. The profiler records each allocation (+bytes) and free (-bytes) of the
  CPU allocator as a "[memory]" event; the running sum of those events in time order starts at 0
  with the inputs already allocated (the previous run's gradient is freed before, not inside, the
  measured call), so its maximum is the peak memory allocated above that baseline, the gradient
  of the logits included. The method is checked at start on known allocations (a buffer freed
  before a smaller one is allocated, a forward + backward whose peak is known) and the script
  stops if it is off.
- peak extra memory, CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated
  before the call, after ``reset_peak_memory_stats()``. On CUDA the cases run under bf16
  autocast with bf16 logits, as a model under autocast emits them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from benchmem import check_cpu_memory_method, peak_cpu_bytes, peak_cuda_bytes

import segtrain  # noqa: F401
from segtrain.config import load_option
from segtrain.data.class_weights import compute_class_stats, compute_class_weights
from segtrain.losses import (CrossEntropyLoss, DiceLoss, FocalLoss, GeneralizedDiceLoss, LovaszSoftmaxLoss,
                             OhemCrossEntropyLoss, TverskyLoss, build_loss)

IGNORE = 255
REFERENCE = "F.cross_entropy (reference)"
Case = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_inputs(shape: tuple[int, ...], ignore_fraction: float, device: torch.device, seed: int = 0):
    """Logits (N, C, H, W) and an imbalanced target: 16x16 blocks, class c about twice as common as c + 1."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    prior = 0.5 ** torch.arange(c, dtype=torch.float64)
    blocks = torch.multinomial(prior, n * -(-h // 16) * -(-w // 16), replacement=True, generator=g)
    target = blocks.reshape(n, -(-h // 16), -(-w // 16)).repeat_interleave(16, 1).repeat_interleave(16, 2)
    target = target[:, :h, :w].contiguous()
    target[torch.rand(n, h, w, generator=g) < ignore_fraction] = IGNORE
    return logits.to(device), target.to(device)


def median_freq_weights(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    stats = compute_class_stats(list(target.cpu()), num_classes, IGNORE)
    return compute_class_weights(stats, **load_option("weights", "median_freq"))


def make_cases(target: torch.Tensor, num_classes: int, class_weights: torch.Tensor, peers: bool) -> dict[str, Case]:
    device = target.device

    def composite(name: str, fuse: bool = True) -> Case:
        loss_fn = build_loss(load_option("loss", name), class_weights,
                             num_classes=num_classes, ignore_index=IGNORE, fuse=fuse).to(device)
        return lambda logits, target: loss_fn(logits, target)["loss"]

    def module(loss_fn: torch.nn.Module) -> Case:
        return loss_fn.to(device)

    cases: dict[str, Case] = {
        REFERENCE: lambda logits, target: F.cross_entropy(logits, target, ignore_index=IGNORE),
        "CrossEntropyLoss": module(CrossEntropyLoss()),
        "FocalLoss": module(FocalLoss()),
        "DiceLoss": module(DiceLoss()),
        "GeneralizedDiceLoss": module(GeneralizedDiceLoss()),
        "TverskyLoss": module(TverskyLoss()),
        "LovaszSoftmaxLoss": module(LovaszSoftmaxLoss()),
        "OhemCrossEntropyLoss": module(OhemCrossEntropyLoss()),
        "focal_dice (build_loss, class weights)": composite("focal_dice"),
        # The same terms one after the other (CompositeLoss.fuse off): what the shared pass saves.
        "focal_dice, terms apart (fuse=False)": composite("focal_dice", fuse=False),
        "ce_dice (build_loss, class weights)": composite("ce_dice"),
        "ce_dice, terms apart (fuse=False)": composite("ce_dice", fuse=False),
    }
    if peers:
        try:
            from monai.losses import DiceCELoss, DiceFocalLoss
        except ImportError:
            print("MONAI is not installed: its peer rows are left out", file=sys.stderr)
        else:
            # MONAI takes (N, 1, H, W) targets; without ignore_index it needs a real class at ignored pixels.
            monai_target = target.clamp_max(num_classes - 1).unsqueeze(1)
            for name, peer in (("MONAI DiceFocalLoss", DiceFocalLoss), ("MONAI DiceCELoss", DiceCELoss)):
                loss_fn = peer(softmax=True, to_onehot_y=True).to(device)
                cases[name] = lambda logits, _, fn=loss_fn: fn(logits, monai_target)
    return cases


def forward_backward(case: Case, logits: torch.Tensor, target: torch.Tensor, amp: bool) -> None:
    logits.grad = None
    with torch.autocast(logits.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = case(logits, target)
    loss.backward()


def bench_shape(shape, args, device: torch.device, amp: bool) -> list[tuple[str, float, float]]:
    logits, target = make_inputs(shape, args.ignore_fraction, device)
    logits = (logits.to(torch.bfloat16) if amp else logits).requires_grad_(True)
    cases = make_cases(target, shape[1], median_freq_weights(target, shape[1]).to(device), args.peers)
    names = [n for n in cases if n == REFERENCE or not args.only or any(s.lower() in n.lower() for s in args.only)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        for name in names:
            forward_backward(cases[name], logits, target, amp)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            sync()
            start = time.perf_counter()
            forward_backward(cases[name], logits, target, amp)
            sync()
            times[name].append(time.perf_counter() - start)
    peak = peak_cuda_bytes if device.type == "cuda" else peak_cpu_bytes
    rows = []
    for name in names:
        logits.grad = None  # freed here, not inside the measured call, where its free would offset the peak
        nbytes = peak(lambda name=name: forward_backward(cases[name], logits, target, amp))
        rows.append((name, statistics.median(times[name]) * 1e3, nbytes / 2**20))
    logits.grad = None
    return rows


def _load() -> str:
    """The 1-minute load average at start: other jobs on the machine slow the many-op losses most."""
    if not hasattr(os, "getloadavg"):
        return ""
    return f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8,3,512,512", "4,21,512,512"], help="N,C,H,W logits")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--ignore-fraction", type=float, default=0.05)
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="leave out the MONAI rows")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="only the losses whose name contains TEXT")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    if any(len(s) != 4 for s in shapes):
        raise SystemExit(f"--shapes takes N,C,H,W, got {args.shapes}")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    if device.type == "cpu":
        check_cpu_memory_method()

    print(f"`python {shlex.join(sys.argv)}`\n")
    print(f"torch {torch.__version__}, {device.type}{', bf16 autocast' if amp else ', fp32'}, "
          f"torch threads: {torch.get_num_threads()}, median of {args.reps} interleaved forward+backward runs, "
          f"{args.ignore_fraction:.0%} ignored pixels{_load()}\n")
    print("| loss | logits | ms | time / CE | peak extra MiB | memory / CE |\n|---|---|---|---|---|---|")
    for shape in shapes:
        rows = bench_shape(shape, args, device, amp)
        ref_ms, ref_mib = rows[0][1], rows[0][2]
        for name, ms, mib in rows:
            print(f"| {name} | {'x'.join(map(str, shape))} | {ms:.1f} | {ms / ref_ms:.2f}x | {mib:.0f} | "
                  f"{mib / ref_mib:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
