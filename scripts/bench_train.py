"""Training-step throughput of the default model under each runtime switch.

Every variant runs the real ``engine.train_one_epoch`` on the synthetic dataset, in this one
process, and is reported as a ratio to the reference (fp32, contiguous, no workers), so the
machine's noise cancels out of the comparison. The last two columns are the time of one
metric update as a share of a training step: the train-time soft Dice tracker (every step)
and a confusion-matrix update (every evaluation batch). On a CUDA machine the GPU variants
(fp16/bf16 autocast, channels_last, torch.compile) are added, with peak memory. Two CPU rows
price long-run safety: last.pt every 10 steps (``trainer.checkpoint_every=10``; the write's own
time is reported too) and ``trainer.on_nonfinite=skip`` (one host read per step); a second table
gives the per-step signal check as a share of a step. Two more price logging every step: TensorBoard
alone, and TensorBoard with ``tracking=mlflow`` (``--only "every step"`` runs just those two).

    python scripts/bench_train.py                 # CPU variants
    python scripts/bench_train.py --steps 40 --batch-size 16 --size 256
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import segtrain  # noqa: F401
from segtrain.build import build_data, build_loaders, build_model, place_model
from segtrain.checkpoint import RunOutput, TrainState
from segtrain.config import compose_config
from segtrain.losses import build_loss
from segtrain.metrics import ConfusionMatrix, SoftDiceTracker
from segtrain.training.dashboard import TensorBoardLogger
from segtrain.training.engine import FitOptions, Runtime, TrainParts, train_one_epoch
from segtrain.training.signals import StopSignals


def _variants(cuda: bool) -> list[dict]:
    cpu = [
        {"name": "cpu fp32 (reference)", "device": "cpu", "amp": None, "workers": 0},
        {"name": "cpu fp32, 2 workers", "device": "cpu", "amp": None, "workers": 2},
        {"name": "cpu bf16 autocast", "device": "cpu", "amp": torch.bfloat16, "workers": 0},
        {"name": "cpu fp32 channels_last", "device": "cpu", "amp": None, "workers": 0, "channels_last": True},
        # Long runs: last.pt every 10 steps (written into a temporary folder), and one host read per step.
        {"name": "cpu fp32, checkpoint_every=10", "device": "cpu", "amp": None, "workers": 0, "checkpoint_every": 10},
        {"name": "cpu fp32, on_nonfinite=skip", "device": "cpu", "amp": None, "workers": 0, "on_nonfinite": "skip"},
        # Logging at every step (--log-every, 1 by default: the worst case): TensorBoard alone, then TensorBoard and
        # MLflow (tracking=mlflow, the local SQLite store; the tracker's queue drained inside the timing).
        {"name": "cpu fp32, TensorBoard every step", "device": "cpu", "amp": None, "workers": 0,
         "logger": "tensorboard"},
        {"name": "cpu fp32, TensorBoard + MLflow every step", "device": "cpu", "amp": None, "workers": 0,
         "logger": "mlflow"},
    ]
    if not cuda:
        return cpu
    return [
        {"name": "cuda fp32 (reference)", "device": "cuda", "amp": None, "workers": 8},
        {"name": "cuda fp16 autocast", "device": "cuda", "amp": torch.float16, "workers": 8},
        {"name": "cuda bf16 autocast", "device": "cuda", "amp": torch.bfloat16, "workers": 8},
        {"name": "cuda bf16 channels_last", "device": "cuda", "amp": torch.bfloat16, "workers": 8,
         "channels_last": True},
        {"name": "cuda bf16 channels_last compile", "device": "cuda", "amp": torch.bfloat16, "workers": 8,
         "channels_last": True, "compile": True},
    ]


def _measure(cfg, variant: dict, steps: int, warmup: int) -> tuple[float, float | None]:
    device = torch.device(variant["device"])
    cfg.trainer.num_workers = variant["workers"]
    train_loader, _, steps_per_epoch = build_loaders(build_data(cfg.dataset), cfg, device)
    rt = Runtime(device, variant["amp"], variant.get("channels_last", False))
    torch.manual_seed(0)
    model = place_model(build_model(cfg.model), rt)
    loss_fn = build_loss(cfg.loss, None, num_classes=cfg.dataset.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    parts = TrainParts(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       torch.amp.GradScaler(device.type, enabled=variant["amp"] == torch.float16),
                       net=torch.compile(model) if variant.get("compile") else model)
    if steps + warmup > steps_per_epoch:
        raise SystemExit(f"--steps + --warmup = {steps + warmup} exceeds the {steps_per_epoch} steps of one epoch")

    every, writes = variant.get("checkpoint_every"), []
    folder = Path(tempfile.mkdtemp(prefix="bench_train_"))
    out = RunOutput(folder, meta={"config": "", "class_names": list(cfg.dataset.class_names)})

    def run(n: int, epoch: int) -> float:
        state = TrainState()
        logger = _logger(variant.get("logger"), folder / f"log_{epoch}", list(cfg.dataset.class_names))
        opts = FitOptions(epochs=1, steps_per_epoch=n, batch_size=cfg.trainer.batch_size,
                          class_names=list(cfg.dataset.class_names),
                          log_every=variant.get("log_every", 1) if logger else n, progress=False,
                          checkpoint_every=every, stop=StopSignals(),
                          on_nonfinite=variant.get("on_nonfinite", "stop"))

        def on_step() -> None:  # as engine.fit does it
            if every and state.step % every == 0:
                start = time.perf_counter()
                out.save_last(parts, state)
                writes.append(time.perf_counter() - start)

        train_loader.sampler.set_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_one_epoch(parts, train_loader, loss_fn, rt, state, opts, logger=logger, on_step=on_step)
        if logger is not None:
            logger.close()
            if logger.tracker is not None:
                logger.tracker.close()  # waits until every queued metric is written
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(warmup, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(steps, 1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    step = seconds / steps
    tracker, matrix = _metric_seconds(cfg, device)
    shutil.rmtree(folder)
    extra = {"signal check / step": _signal_check_seconds(device) / step}
    if writes:
        extra["checkpoint write"] = f"{1000 * statistics.median(writes):.0f} ms ({len(writes)} writes)"
    return steps * cfg.trainer.batch_size / seconds, peak, (tracker / step, matrix / step), extra


def _logger(kind: str | None, folder: Path, class_names: list[str]) -> TensorBoardLogger | None:
    """None, TensorBoard alone, or TensorBoard with an MLflow run in a local SQLite store (its set-up untimed)."""
    if kind is None:
        return None
    tracker = None
    if kind == "mlflow":
        from types import SimpleNamespace

        from segtrain.tracking.mlflow_run import start_run

        folder.mkdir(parents=True)
        tracking = SimpleNamespace(uri=f"sqlite:///{folder / 'mlflow.db'}", experiment="bench", run_name=None)
        tracker = start_run(tracking, folder, [], None)
    return TensorBoardLogger(folder / "tensorboard", class_names, tracker=tracker)


def _signal_check_seconds(device: torch.device, repeats: int = 10000) -> float:
    """Seconds per ``StopSignals.requested`` call, the check after every optimizer step (under DDP it is
    one all-reduce of three numbers, measured by scripts/bench_ddp.py's steps as a whole)."""
    stop = StopSignals()
    start = time.perf_counter()
    for _ in range(repeats):
        stop.requested(device)
    return (time.perf_counter() - start) / repeats


def _metric_seconds(cfg, device: torch.device, repeats: int = 20) -> tuple[float, float]:
    """Seconds per call of the train-time soft Dice tracker (run every step) and of a
    confusion-matrix update (run every evaluation batch), on logits of one batch."""
    num_classes, size = cfg.dataset.num_classes, cfg.dataset.generate.size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(cfg.trainer.batch_size, num_classes, size, size, generator=g).to(device)
    target = torch.randint(0, num_classes, (cfg.trainer.batch_size, size, size), generator=g).to(device)
    tracker, matrix = SoftDiceTracker(num_classes), ConfusionMatrix(num_classes, device=device)
    seconds = []
    for update in (lambda: tracker.update(logits, target), lambda: matrix.update(logits, target)):
        update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - start) / repeats)
    return seconds[0], seconds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="synthetic image size")
    parser.add_argument("--root", default="data/synthetic_bench")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", default=None, help="run only the variants whose name contains this text "
                        "(the first one kept is the reference)")
    parser.add_argument("--log-every", type=int, default=1, help="optimizer steps between log points of the "
                        "logging variants (1: the worst case; trainer.log_every's default is 10)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.encoder=resnet34")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    count = (args.steps + args.warmup) * args.batch_size
    cfg = compose_config([
        f"dataset.root={args.root}", f"dataset.generate.num_train={count}", "dataset.generate.num_val=2",
        f"dataset.generate.size={args.size}", f"trainer.batch_size={args.batch_size}", *args.overrides])
    rows = []
    variants = [{**v, "log_every": args.log_every} if "logger" in v else v
                for v in _variants(torch.cuda.is_available()) if args.only is None or args.only in v["name"]]
    extras = []
    for variant in variants:
        speed, peak, metric_share, extra = _measure(cfg, variant, args.steps, args.warmup)
        rows.append((variant["name"], speed, peak, metric_share))
        extras.append((variant["name"], extra))
    reference = rows[0][1]
    print(f"model {cfg.model._target_.rsplit('.', 1)[-1]}({cfg.model.encoder}), batch {args.batch_size}, "
          f"{args.size}x{args.size}, {args.steps} timed steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| variant | images/s | ratio to reference | peak GPU memory (MiB) | soft Dice update / step "
          "| confusion-matrix update / step |")
    print("|---|---|---|---|---|---|")
    for name, speed, peak, (tracker, matrix) in rows:
        print(f"| {name} | {speed:.1f} | {speed / reference:.2f}x | {'-' if peak is None else f'{peak:.0f}'} "
              f"| {100 * tracker:.2f}% | {100 * matrix:.2f}% |")
    print("\n| variant | signal check / step | checkpoint write (median) |\n|---|---|---|")
    for name, extra in extras:
        print(f"| {name} | {100 * extra['signal check / step']:.5f}% | {extra.get('checkpoint write', '-')} |")


if __name__ == "__main__":
    main()
