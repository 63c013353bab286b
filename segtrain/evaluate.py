"""``python -m segtrain.evaluate checkpoint=<path> [overrides ...]``: score a checkpoint.

The run's own config comes from the checkpoint. Overrides use the training command's syntax
and replace only what they name: ``dataset=folder dataset.root=/data/other`` swaps the dataset
and keeps the model, loss and class weights the checkpoint was trained with;
``dataset.split=test`` scores another split; ``inference.mode=slide inference.tile=512``
scores it the way ``python -m segtrain.predict`` predicts (sliding windows, test-time flips and
scales: see configs/inference/default.yaml).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


from segtrain.build import (build_loss_fn, build_runtime, class_names_of, eval_loader, eval_split, inference_options,
                            model_from_checkpoint, place_model, resolve_num_workers)
from segtrain.checkpoint import read_with_overrides
from segtrain.engine import evaluate
from segtrain.metrics import flatten_metrics, format_table

USAGE = "usage: python -m segtrain.evaluate checkpoint=<path/to/last.pt> [key=value | group=option ...]"


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None) -> tuple[dict, list[str]]:
    """Metrics of the checkpoint on the configured split: (ConfusionMatrix.compute() + loss, class names)."""
    saved, cfg = read_with_overrides(path, overrides)
    ds, tr = cfg.dataset, cfg.trainer
    class_names = class_names_of(ds)
    rt = build_runtime(tr)
    workers = resolve_num_workers(tr.num_workers, rt.device)
    split = eval_split(ds, ds.get("split") or ds.val_split, workers)
    model = place_model(model_from_checkpoint(saved, cfg), rt)
    loss_fn = build_loss_fn(cfg, saved.class_weights, rt.device)
    result = evaluate(model, eval_loader(split, ds, workers), loss_fn, rt, ds.num_classes, ds.ignore_index,
                      inference=inference_options(cfg, rt.device, amp_dtype=rt.amp_dtype))
    return result.metrics, class_names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if len(paths) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    overrides = [a for a in argv if not a.startswith("checkpoint=")]
    metrics, class_names = evaluate_checkpoint(paths[0], overrides)
    print(f"{paths[0]}:")
    print(format_table(metrics, class_names))
    print(f"loss {metrics['loss']:.4f}")
    print("metrics: " + json.dumps(flatten_metrics(metrics, class_names, "val")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
