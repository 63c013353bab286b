"""What the per-image report and the calibration histograms add to an evaluation.

One evaluation (``segtrain.training.engine.evaluate``) of the configured model (random weights, eval mode) over the
configured validation split, as ``python -m segtrain.evaluate`` runs it (its loader, its loss), four ways:
plain (the reference), with the per-image confusion matrices, with the reliability histograms (15 bins),
and with both, as training's evaluations run. The variants alternate round by round (so that a slow phase
of the shared machine hits all alike); each is reported as the median over rounds and as a ratio to the
plain evaluation. The updates alone are timed too, against one batch's forward pass. The galleries (each
class's worst predictions kept, shrunk, and drawn) are not part of it: scripts/bench_report.py measures them.

    python scripts/bench_eval.py                                  # the default config: UNet-R18, synthetic val
    python scripts/bench_eval.py --rounds 9 trainer.device=cuda dataset.batch_size_val=32
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.analysis.calibration import ReliabilityHistogram
from segtrain.analysis.per_image import PerImageConfusion
from segtrain.build import build_loss_fn, build_model, build_runtime, eval_loader, eval_split, place_model
from segtrain.config import compose_config
from segtrain.training.engine import evaluate

VARIANTS = {"plain": (False, None), "per-image": (True, None), "calibration": (False, 15), "both": (True, 15)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("overrides", nargs="*", help="training-config overrides (dataset=..., model=...)")
    args = parser.parse_args(argv)
    cfg = compose_config(args.overrides)
    ds = cfg.dataset
    rt = build_runtime(cfg.trainer)
    device = rt.device
    split = eval_split(ds, ds.val_split)
    loader = eval_loader(split, ds, 0)
    model = place_model(build_model(cfg.model), rt).eval()
    loss_fn = build_loss_fn(cfg, torch.ones(ds.num_classes), device)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, (per_image, bins) in VARIANTS.items():
            times[name].append(_time(lambda: evaluate(model, loader, loss_fn, rt, ds.num_classes, ds.ignore_index,
                                                      per_image=per_image, calibration_bins=bins), device))
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(f"$ python scripts/bench_eval.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{len(split)} images of {ds.name} val in batches of {ds.batch_size_val}, {ds.num_classes} classes, "
          f"{type(model).__name__} ({cfg.model.get('encoder')}) on {device}, amp {rt.amp_dtype or 'none'}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'evaluation':<12} {'seconds':>8} {'ratio':>7}")
    for name, seconds in medians.items():
        print(f"{name:<12} {seconds:8.3f} {seconds / medians['plain']:7.3f}x")

    # The updates alone against one batch's forward pass (under the run's autocast, as evaluate runs it).
    images, masks = rt.to_device(*next(iter(loader)))
    with torch.no_grad(), rt.autocast():
        logits = model(images)
    preds = logits.max(dim=1).indices
    indices = list(range(images.shape[0]))
    cm = PerImageConfusion(ds.num_classes, ds.ignore_index, device=device)
    hist = ReliabilityHistogram(ds.num_classes, 15, ds.ignore_index, device=device)
    reps = 10

    def forward():
        with torch.no_grad(), rt.autocast():
            model(images)

    seconds = statistics.median(_time(forward, device) for _ in range(5))
    per_image = _time(lambda: [cm.update(preds, masks, indices) for _ in range(reps)], device) / reps
    histogram = _time(lambda: [hist.update(logits, masks) for _ in range(reps)], device) / reps
    print(f"one batch: forward {seconds * 1e3:.1f} ms; per-image update {per_image * 1e3:.2f} ms "
          f"({per_image / seconds:.2%}), histogram update {histogram * 1e3:.2f} ms ({histogram / seconds:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
