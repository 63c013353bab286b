"""Latency of the exported files against PyTorch eager, per model, in one run.

Each model (random weights, BatchNorm statistics from two random batches, eval mode) is traced
once with ``segtrain.inference.deploy.trace`` (dynamic batch, height and width, logits head, float input),
saved as ONNX (``segtrain.inference.deploy.to_onnx``, the graph ``python -m segtrain.export`` writes) and as
an ExportedProgram (.pt2), and the three are timed on the same (1, 3, size, size) input: PyTorch
eager under ``torch.inference_mode``, ONNX Runtime's CPU provider (all graph optimisations, as
``onnxruntime.InferenceSession`` applies by default) and ``torch.export.load(...).module()``.
The rounds alternate between the three, so a load change on the machine hits all of them; each
gets the median of its rounds, reported as a ratio to eager's. Threads: ``--threads`` for torch
and ONNX Runtime's intra-op pool alike.

    python scripts/bench_export.py                             # the default UNet and DeepLabV3+ at 512, 2 threads
    python scripts/bench_export.py --models unet-resnet18 --rounds 20
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import segtrain  # noqa: F401
from segtrain.inference.deploy import DeployModel, to_onnx, trace
from segtrain.models import DeepLabV3Plus, UNet

# configs/model/*.yaml's defaults (3 classes: the synthetic dataset's).
MODELS = {
    "unet-resnet18": lambda: UNet(3, encoder="resnet18", decoder_channels=(128, 64, 32, 16, 16)),
    "unet-mobilenet": lambda: UNet(3, encoder="mobilenet_v3_large", decoder_channels=(128, 64, 32, 16, 16)),
    "dlv3p-resnet50-os16": lambda: DeepLabV3Plus(3, encoder="resnet50", output_stride=16),
    "dlv3p-mobilenet-os16": lambda: DeepLabV3Plus(3, encoder="mobilenet_v3_large", output_stride=16),
}


def _timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def _with_statistics(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 128, 128))
    return model.eval()


def bench(name: str, size: int, rounds: int, threads: int, folder: Path) -> str:
    import onnxruntime as ort

    torch.manual_seed(0)
    net = DeployModel(_with_statistics(MODELS[name]()))
    start = time.perf_counter()
    program = trace(net, channels=3, size=(size, size))
    t_trace = time.perf_counter() - start
    start = time.perf_counter()
    to_onnx(program, opset=18, output_name="logits", metadata={}).save(str(folder / f"{name}.onnx"))
    t_onnx = time.perf_counter() - start
    torch.export.save(program, folder / f"{name}.pt2")

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
    loaded = torch.export.load(folder / f"{name}.pt2").module()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    x_np = x.numpy()

    def eager(inp):
        with torch.inference_mode():
            return net(inp)

    def program_fn(inp):
        with torch.inference_mode():
            return loaded(inp)

    runners = {"eager": (eager, x), "onnxruntime": (lambda inp: session.run(None, {"image": inp}), x_np),
               "exported": (program_fn, x)}
    for fn, inp in runners.values():  # warm-up: first-call allocations and kernel choices
        fn(inp)
    times: dict[str, list[float]] = {key: [] for key in runners}
    for index in range(rounds):
        order = list(runners) if index % 2 == 0 else list(reversed(runners))
        for key in order:
            times[key].append(_timed(*runners[key]))
    median = {key: statistics.median(values) for key, values in times.items()}
    diff = (torch.from_numpy(session.run(None, {"image": x_np})[0]) - eager(x)).abs().max()
    return (f"| {name} | {median['eager'] * 1e3:.0f} | {median['onnxruntime'] * 1e3:.0f} "
            f"| {median['onnxruntime'] / median['eager']:.2f}x | {median['exported'] * 1e3:.0f} "
            f"| {median['exported'] / median['eager']:.2f}x | {diff:.1e} | {t_trace:.0f} + {t_onnx:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["unet-resnet18", "dlv3p-resnet50-os16"], choices=MODELS)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime

    torch.set_num_threads(args.threads)
    print(f"`python scripts/bench_export.py {shlex.join(sys.argv[1:])}`\n")
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, CPU, {args.threads} threads, "
          f"batch 1, {args.size}x{args.size}, median of {args.rounds} alternating rounds{load}\n")
    print("| model | eager ms | ONNX Runtime ms | ORT / eager | ExportedProgram ms | EP / eager "
          "| max abs diff ORT | trace + ONNX s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            print(bench(name, args.size, args.rounds, args.threads, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
