"""``python -m segtrain.evaluate checkpoint=<path> [overrides ...]``: score a checkpoint.

The run's own config comes from the checkpoint. Overrides use the training command's syntax
and replace only what they name: ``dataset=folder dataset.root=/data/other`` swaps the dataset
and keeps the model, loss and class weights the checkpoint was trained with;
``dataset.split=test`` scores another split; ``inference.mode=slide inference.tile=512``
scores it the way ``python -m segtrain.predict`` predicts (sliding windows, test-time flips and
scales: see configs/inference/default.yaml).

Besides the table (headed by the split and the dataset root): top-label and per-class ECE (``calibration.bins``),
the metrics under the split's name (``test/mIoU``, ``test/dice/<class>``: training's validation is ``val/...``),
printed and saved as metrics.json beside the per-image report (``segtrain.analysis.per_image``: per_image.csv,
report.md with the ``report.worst_k`` worst images per class and, unless ``report.galleries=false``, their
galleries) in ``report.dir``, by default ``<run dir>/eval/<split>/``. A checkpoint calibrated by
``segtrain.calibrate`` is scored with its temperature and bias, and not on the split they were fitted on
(unless ``--same-split-ok``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from segtrain.analysis.calibration import fitted_on
from segtrain.analysis.hard_cases import write_report
from segtrain.atomic import atomic_write
from segtrain.build import CheckpointOnSplit, build_loss_fn
from segtrain.checkpoint import SavedModel
from segtrain.metrics import flatten_metrics, format_table
from segtrain.training.engine import evaluate

log = logging.getLogger("segtrain.evaluate")

USAGE = ("usage: python -m segtrain.evaluate checkpoint=<path/to/last.pt> [report.dir=<folder>] [--same-split-ok] "
         "[key=value | group=option ...]")


def check_held_out(saved: SavedModel, cfg, split, same_split_ok: bool) -> None:
    """A checkpoint calibrated on this very split would score optimistically on it: refused unless asked for."""
    cal = saved.calibration
    if cal is None or not cfg.inference.calibrated or same_split_ok:
        return
    here = fitted_on(split)
    if (cal["fitted_on"]["root"], cal["fitted_on"]["split"]) == (here["root"], here["split"]):
        raise ValueError(f"{saved.path} was calibrated on {here['name']} (segtrain.calibrate): its score there is "
                         "optimistic. Score a held-out split (dataset.split=<split> or dataset.root=<other data>), "
                         "or pass --same-split-ok")


def report_dir(saved: SavedModel, cfg, split, folder: str | None) -> Path:
    """``report.dir``, else ``<run dir>/eval/<split>/`` beside the checkpoint's run (``<data folder>_<split>`` for
    another dataset root than the run's, ``_calibrated`` appended when a calibration is applied)."""
    if folder:
        return Path(folder).expanduser()
    run_dir = saved.path.parent.parent if saved.path.parent.name == "checkpoints" else saved.path.parent
    name = split.split
    if Path(split.root).resolve() != Path(saved.config.dataset.root).resolve():
        name = f"{Path(split.root).name}_{name}"
    if saved.calibration is not None and cfg.inference.calibrated:
        name += "_calibrated"
    return run_dir / "eval" / name


@dataclass
class Scored:
    """A checkpoint scored on a split: ``ConfusionMatrix.compute()`` + loss and ECE, and where they come from."""

    metrics: dict
    class_names: list[str]
    split: str
    root: str
    images: int

    @property
    def header(self) -> str:
        return f"split {self.split} of {self.root} ({self.images} images)"

    def flat(self) -> dict[str, float]:
        """``<split>/mIoU``, ``<split>/dice/<class>``, ...: named by the split scored (training's: ``val``)."""
        return flatten_metrics(self.metrics, self.class_names, self.split)


def score_checkpoint(path: str | Path, overrides: list[str] | None = None, same_split_ok: bool = False,
                     report: bool = True) -> Scored:
    """The checkpoint scored on the configured split; with ``report``, the per-image report and metrics.json (the
    split, its root, the checkpoint, ``Scored.flat``) in ``report_dir``."""
    run = CheckpointOnSplit.open(path, overrides).read_split()
    saved, cfg, ds, rt, options = run.saved, run.cfg, run.cfg.dataset, run.runtime, run.analysis
    check_held_out(saved, cfg, run.split, same_split_ok)
    loss_fn = build_loss_fn(cfg, saved.class_weights, rt.device)
    galleries = report and options.report.galleries
    result = evaluate(run.model, run.loader, loss_fn, rt, ds.num_classes, ds.ignore_index, inference=run.inference,
                      per_image=report, calibration_bins=options.calibration.bins,
                      multilabel=run.inference.multilabel, postprocess=run.postprocess,
                      worst_k=options.report.worst_k if galleries else 0)
    scored = Scored(result.metrics, run.class_names, str(run.split.split), str(run.split.root), len(run.split))
    if report:
        folder = report_dir(saved, cfg, run.split, options.report.dir)
        write_report(folder, run.split, result.per_image, result.hard_cases if galleries else None, run.class_names,
                     options.report.worst_k, ds.mean, ds.std, ds.ignore_index)
        text = json.dumps({"split": scored.split, "root": scored.root, "images": scored.images,
                           "checkpoint": str(path), "metrics": scored.flat()}, indent=1) + "\n"
        atomic_write(folder / "metrics.json", lambda tmp: tmp.write_text(text))
    return scored


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None, same_split_ok: bool = False,
                        report: bool = True) -> tuple[dict, list[str]]:
    """(metrics, class names) of ``score_checkpoint``."""
    scored = score_checkpoint(path, overrides, same_split_ok, report)
    return scored.metrics, scored.class_names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    same_split_ok = "--same-split-ok" in argv
    argv = [a for a in argv if a != "--same-split-ok"]
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if len(paths) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    overrides = [a for a in argv if not a.startswith("checkpoint=")]
    try:
        scored = score_checkpoint(paths[0], overrides, same_split_ok)
    except (OSError, ValueError, RuntimeError) as err:  # each names the file, key or value at fault
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics, class_names = scored.metrics, scored.class_names
    print(f"{paths[0]}, {scored.header}:")
    print(format_table(metrics, class_names))
    print(f"loss {metrics['loss']:.4f}")
    if "ece" in metrics:
        per_class = ", ".join(f"{n} {v:.4f}" for n, v in zip(class_names, metrics["class_ece"].tolist()))
        print(f"ECE {metrics['ece']:.4f} (top label; multi-label: every channel's entries pooled); per class: "
              f"{per_class}")
    print("metrics: " + json.dumps(scored.flat()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
