"""Parameters, FLOPs, time and memory of one training step for each architecture x encoder.

Each model runs forward + cross-entropy on random targets + backward (train mode, no
optimizer step) on one random batch. On CPU the models take turns, round-robin, so load
noise from other processes spreads over all of them; every time is also given as a ratio
to the reference model (``--reference``, default UNet-ResNet-18) measured in the same run.
CPU time (``time.process_time``) is given beside wall time: on a shared machine it is the
steadier of the two. Peak memory comes from the profiler's allocation events (first step).
On CUDA each model is timed under every variant of bf16 autocast x channels_last x
torch.compile, with ``torch.cuda.synchronize`` and ``max_memory_allocated``.

    python scripts/bench_models.py                              # CPU: 512x512, batch 2
    python scripts/bench_models.py --size 256 --repeats 2 --models unet-resnet18 dlv3p-resnet50-os8
    python scripts/bench_models.py --device cuda --batch 16 --variants fp32 bf16+cl+compile

Model names: ``unet-<encoder>``, ``unet-classic<base_width>`` (encoder=None),
``dlv3p-<encoder>-os<8|16>``, and ``resnet50-cls`` (torchvision's ResNet-50 classifier, a
well-known anchor). Encoders are the names in ``segtrain.models.ENCODERS``. UNets use the
class default decoder (256, 128, 64, 32, 16) unless ``--decoder-channels`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# Before OpenMP starts (at torch's import). Idle OpenMP threads spin by default; on a shared
# CPU a spinning thread waits for a descheduled partner and steps take 2-4x longer, in wall
# and in CPU time. Passive waiting keeps the CPU time of a step stable under load.
# OMP_WAIT_POLICY=ACTIVE in the environment restores the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import segtrain  # noqa: F401, E402  (makes torchvision importable; must precede it)
import torchvision  # noqa: E402  # isort: skip  (after segtrain, whose shim it needs)
from segtrain.models import ENCODERS, DeepLabV3Plus, UNet  # noqa: E402

DEFAULT_MODELS = (
    "unet-resnet18", "unet-resnet34", "unet-resnet50", "unet-mobilenet_v3_large",
    "unet-efficientnet_b0", "unet-classic32",
    "dlv3p-resnet18-os16", "dlv3p-resnet50-os16", "dlv3p-resnet50-os8",
    "dlv3p-mobilenet_v3_large-os16", "resnet50-cls",
)
CUDA_VARIANTS = ("fp32", "bf16", "fp32+cl", "bf16+cl",
                 "fp32+compile", "bf16+compile", "fp32+cl+compile", "bf16+cl+compile")
ANCHOR_CLASSES = 1000


@dataclass
class Bench:
    name: str
    build: Callable[[], nn.Module]
    classifier: bool = False  # targets are (N,) image labels instead of (N, H, W) masks


def parse_model(name: str, num_classes: int, decoder: tuple[int, ...] | None) -> Bench:
    """``unet-resnet18`` / ``unet-classic32`` / ``dlv3p-resnet50-os8`` / ``resnet50-cls``."""
    if name == "resnet50-cls":
        return Bench(name, lambda: torchvision.models.resnet50(weights=None), classifier=True)
    arch, _, rest = name.partition("-")
    if arch == "unet" and rest.startswith("classic") and rest[7:].isdigit():
        width = int(rest[7:])
        return Bench(name, lambda: UNet(num_classes, encoder=None, base_width=width,
                                        decoder_channels=decoder and decoder[1:]))
    if arch == "unet" and rest in ENCODERS:
        return Bench(name, lambda: UNet(num_classes, encoder=rest, decoder_channels=decoder))
    encoder, _, stride = rest.rpartition("-os")
    if arch == "dlv3p" and encoder in ENCODERS and stride in ("8", "16"):
        return Bench(name, lambda: DeepLabV3Plus(num_classes, encoder=encoder,
                                                 output_stride=int(stride)))
    raise SystemExit(
        f"--models: unknown model {name!r}; valid forms: unet-<encoder>, unet-classic<width>, "
        f"dlv3p-<encoder>-os<8|16>, resnet50-cls; encoders: {', '.join(ENCODERS)}"
    )


def make_batch(bench: Bench, batch: int, size: int, num_classes: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    if bench.classifier:
        return x, torch.randint(0, ANCHOR_CLASSES, (batch,), generator=generator)
    return x, torch.randint(0, num_classes, (batch, size, size), generator=generator)


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    # set_to_none: every step allocates its gradients, as the first step of training does.
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()


def forward_gflops(bench: Bench, size: int) -> float:
    """Forward GFLOP for one image (2 per multiply-add), counted on the meta device: no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = bench.build().train()
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def peak_extra_mib(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    """Peak of (bytes allocated - bytes freed) during one step, from the profiler's memory events.

    Counts what the step adds on top of the model and the batch: activations saved for
    backward, gradients (set to None before the step), temporaries.
    """
    from torch.profiler import ProfilerActivity, profile

    # Outside the profiler: it reports the frees of blocks allocated before it started.
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        F.cross_entropy(model(x), target).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()  # negative for a free
        peak = max(peak, current)
    return peak / 2**20


def run_cpu(benches: list[Bench], args) -> list[dict]:
    """Warm-up rounds, then timed rounds; each round runs every model once, in order."""
    models = {}
    batches = {}
    for bench in benches:
        torch.manual_seed(0)
        models[bench.name] = bench.build().train()
        batches[bench.name] = make_batch(bench, args.batch, args.size, args.num_classes)
    wall: dict[str, list[float]] = {b.name: [] for b in benches}
    cpu: dict[str, list[float]] = {b.name: [] for b in benches}
    memory: dict[str, float] = {}
    for round_index in range(args.warmup + args.repeats):
        timed = round_index >= args.warmup
        for bench in benches:
            start, start_cpu = time.perf_counter(), time.process_time()
            if round_index == 0 and not timed and not args.no_memory:
                # The first step allocates what later steps do (checked); its time is unused.
                memory[bench.name] = peak_extra_mib(models[bench.name], *batches[bench.name])
            else:
                train_step(models[bench.name], *batches[bench.name])
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            if timed:
                wall[bench.name].append(seconds / args.batch)
                cpu[bench.name].append(cpu_seconds / args.batch)
            print(f"round {round_index + 1}/{args.warmup + args.repeats} "
                  f"{'timed' if timed else 'warm-up'} {bench.name}: {seconds:.2f} s wall, "
                  f"{cpu_seconds:.2f} s CPU", file=sys.stderr, flush=True)
    return [
        {
            "name": bench.name,
            "params": sum(p.numel() for p in models[bench.name].parameters()),
            "gflops": forward_gflops(bench, args.size),
            "wall": statistics.median(wall[bench.name]),
            "low": min(wall[bench.name]),
            "high": max(wall[bench.name]),
            "cpu": statistics.median(cpu[bench.name]),
            "memory": memory.get(bench.name),
        }
        for bench in benches
    ]


def print_cpu_table(rows: list[dict], args) -> None:
    ref = next(r for r in rows if r["name"] == args.reference)
    print(f"| model | params (M) | fwd GFLOP/img | wall s/img, median (min-max) | CPU s/img, "
          f"median | ratio to {args.reference}, wall | ratio, CPU | peak extra memory, "
          f"batch {args.batch} (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        memory = "-" if r["memory"] is None else f"{r['memory']:.0f}"
        print(f"| {r['name']} | {r['params'] / 1e6:.1f} | {r['gflops']:.1f} "
              f"| {r['wall']:.2f} ({r['low']:.2f}-{r['high']:.2f}) | {r['cpu']:.2f} "
              f"| {r['wall'] / ref['wall']:.2f}x | {r['cpu'] / ref['cpu']:.2f}x | {memory} |")


# ---- CUDA: one model at a time, every variant; nothing here runs on a CPU-only machine ----

def time_cuda_variant(bench: Bench, variant: str, args) -> tuple[float, float]:
    """(seconds per image, peak MiB allocated during the timed steps) for one variant."""
    flags = set(variant.split("+")) - {"fp32"}
    device = torch.device(args.device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if "cl" in flags else torch.contiguous_format
    model = bench.build().train().to(device, memory_format=memory_format)
    forward = torch.compile(model) if "compile" in flags else model
    x, target = make_batch(bench, args.batch, args.size, args.num_classes)
    x, target = x.to(device, memory_format=memory_format), target.to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in flags):
            loss = F.cross_entropy(forward(x), target)
        loss.backward()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeats / args.batch
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, forward, x, target
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return seconds, peak


def run_cuda(benches: list[Bench], args) -> dict[tuple[str, str], tuple[float, float]]:
    torch.backends.cudnn.benchmark = True
    results = {}
    for bench in benches:
        for variant in args.variants:
            results[bench.name, variant] = time_cuda_variant(bench, variant, args)
            print(f"{bench.name} {variant}: {results[bench.name, variant][0] * 1e3:.2f} ms/img",
                  file=sys.stderr, flush=True)
    return results


def print_cuda_table(results: dict[tuple[str, str], tuple[float, float]], args) -> None:
    base = args.variants[0]
    reference = results[args.reference, base][0]
    print(f"| model | variant | fwd+bwd ms/img | ratio to its {base} | ratio to {args.reference} "
          f"{base} | peak allocated, batch {args.batch} (MiB) |")
    print("|---|---|---|---|---|---|")
    for (name, variant), (seconds, peak) in results.items():
        own = results[name, base][0]
        print(f"| {name} | {variant} | {seconds * 1e3:.2f} | {seconds / own:.2f}x "
              f"| {seconds / reference:.2f}x | {peak:.0f} |")


# ---- entry point ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--reference", default="unet-resnet18",
                        help="ratios are to this model; added to --models if missing")
    parser.add_argument("--size", type=int, default=512, help="square input side")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per model; default: 3 on CPU, 20 on CUDA")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per model; default: 1 on CPU, 5 on CUDA")
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--decoder-channels", type=lambda s: tuple(map(int, s.split(","))),
                        default=None, help="UNet decoder widths, e.g. 128,64,32,16,16 "
                        "(the classic UNet drops the first entry)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="CPU: do not profile the "
                        "first warm-up step for peak memory (always off with --warmup 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--variants", nargs="+", default=list(CUDA_VARIANTS),
                        help="CUDA: '+'-joined flags from fp32|bf16, cl, compile; "
                        "ratios are to the first")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    cuda = args.device == "cuda"
    args.batch = args.batch or (8 if cuda else 2)
    args.repeats = args.repeats or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if min(args.batch, args.repeats, args.size, args.warmup + 1) < 1:
        parser.error("--batch, --repeats, --size must be >= 1 and --warmup >= 0")
    if args.reference not in args.models:
        args.models.insert(0, args.reference)
    for variant in args.variants:
        unknown = set(variant.split("+")) - {"fp32", "bf16", "cl", "compile"}
        if unknown:
            parser.error(f"--variants {variant!r}: unknown flags {sorted(unknown)}; "
                         "valid: fp32, bf16, cl, compile")
    return args


def describe_machine(args) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        name = models[0] if models else name
    return (f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    benches = [parse_model(n, args.num_classes, args.decoder_channels) for n in args.models]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "scripts/bench_models.py", *sys.argv[1:]])
    load_before = os.getloadavg()[0]
    if args.device == "cuda":
        results = run_cuda(benches, args)
    else:
        rows = run_cpu(benches, args)
    load = f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(f"\n`{command}`\n")
    print(f"{date}, {describe_machine(args)}, torch {torch.__version__}; {args.device}, "
          f"train mode, batch {args.batch}, {args.size}x{args.size}, {args.num_classes} classes, "
          f"{args.warmup} warm-up + {args.repeats} timed steps per model"
          + (", round-robin" if args.device == "cpu" else "") + f"; {load}\n")
    if args.device == "cuda":
        print_cuda_table(results, args)
    else:
        print_cpu_table(rows, args)


if __name__ == "__main__":
    main()
