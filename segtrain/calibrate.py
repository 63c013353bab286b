"""``python -m segtrain.calibrate checkpoint=<path> [dataset.split=val] [decision.tune=true] [overrides ...]``

Fits one temperature (and, with ``decision.tune=true``, a per-class logit bias maximising
``decision.objective``) on a labelled split and writes them into a copy of the checkpoint,
``<name>_calibrated.pt`` (``output=<file>`` to choose); the original is not touched. predict, evaluate and
export then apply ``logits / T + bias`` (``inference.calibrated=false``: not).

    python -m segtrain.calibrate checkpoint=outputs/.../best.pt decision.tune=true decision.objective=dice/spot
    python -m segtrain.evaluate checkpoint=outputs/.../best_calibrated.pt dataset.root=/data/held_out

Two passes over the split with the model's own whole-image logits: the first measures NLL, ECE and the
confusion matrix as they are and samples ``calibration.max_pixels`` labelled pixels (an equal share of each
image, ``calibration.seed``), on which the temperature (LBFGS on the NLL) and the bias (coordinate search,
``segtrain.analysis.decision``) are fitted; the second measures them again with the calibration applied. A bias that
scores lower than none on the whole split (possible only when the sample is smaller than the split) is
dropped. Multi-label models (``segtrain.analysis.thresholds``): one temperature shared by the channels' sigmoids and,
with ``decision.tune=true``, a threshold per channel, stored as the bias ``-logit(threshold)`` (and as
``thresholds``); a channel whose threshold scores lower than 0.5 on the whole split keeps 0.5.
``postprocess.tune=true`` (``segtrain.analysis.postprocess``) also tunes per-class component rules on the split
(remove components under a size, keep the largest, fill small holes), each accepted only when its class improves
and no other class drops by more than ``postprocess.tolerance``; evaluate and predict apply them
(``postprocess.enabled=false``: not), an export carries them in its metadata.
The numbers printed are those of the split fitted on, optimistic by construction: the checkpoint
records that split, and ``segtrain.evaluate`` refuses to score it there unless given ``--same-split-ok``.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

from segtrain.analysis.calibration import (LogitCalibration, PixelSample, ReliabilityHistogram, fit_temperature,
                                           fitted_on, nll)
from segtrain.analysis.decision import (confusion, guarded, parse_objective, per_class_table, predict, switched_off,
                                       tune_bias)
from segtrain.analysis.model_card import note_calibration
from segtrain.analysis.postprocess import report_table, tune, tune_channels
from segtrain.analysis.thresholds import (channel_nll, channel_table, fit_shared_temperature, parse_channel_objective,
                                          thresholds_of, tune_thresholds)
from segtrain.build import CheckpointOnSplit
from segtrain.checkpoint import load_checkpoint, save_checkpoint
from segtrain.inference import scored_logits
from segtrain.inference.postprocessing import split_predictions
from segtrain.metrics import ChannelConfusion, ConfusionMatrix, decide

log = logging.getLogger("segtrain.calibrate")
USAGE = "usage: python -m segtrain.calibrate checkpoint=<path/to/best.pt> [output=<file>] [key=value ...]"
SUFFIX = "_calibrated"


def output_path(checkpoint: Path, output: str | None) -> Path:
    """``output``, or ``<name>_calibrated.pt`` beside the checkpoint (not suffixed twice: the default name of a
    ``<name>_calibrated.pt`` is itself, so calibrating one again needs ``output=``); never the checkpoint itself."""
    path = Path(output) if output else checkpoint.with_name(checkpoint.stem.removesuffix(SUFFIX) + SUFFIX + ".pt")
    if path.resolve() == checkpoint.resolve():
        raise ValueError(f"output={path}: that is the checkpoint being calibrated, which is never overwritten; "
                         "give another output=<file>")
    return path


@torch.no_grad()
def measure(model, loader, rt, calibrations: dict[str, LogitCalibration | None], num_classes: int, ignore_index: int,
            bins: int, sample: PixelSample | None = None, multilabel: bool = False
            ) -> dict[str, tuple[torch.Tensor, ReliabilityHistogram]]:
    """One pass: {name: (confusion matrix, reliability histogram)} of the model's logits under each calibration
    (None: as they are); ``sample`` collects the raw logits of its pixels. Multi-label: (C, 2, 2) matrices."""
    model.eval()
    matrix_of = ChannelConfusion if multilabel else ConfusionMatrix
    out = {name: (matrix_of(num_classes, ignore_index, rt.device),
                  ReliabilityHistogram(num_classes, bins, ignore_index, rt.device, multilabel))
           for name in calibrations}
    for images, masks in loader:
        images, masks = rt.to_device(images, masks)
        with rt.autocast():
            raw = scored_logits(model, images, masks.shape[-2:], None)
        raw = raw.float()
        if sample is not None:
            sample.add(raw, masks)
        for name, calibration in calibrations.items():
            logits = raw if calibration is None else calibration.to(raw.device)(raw)
            preds = decide(logits, multilabel)  # once for both (the histogram would take it again)
            matrix, histogram = out[name]
            matrix.update(preds, masks)
            histogram.update(logits, masks, None if multilabel else preds)
    return {name: (matrix.matrix.cpu(), histogram) for name, (matrix, histogram) in out.items()}


def calibrate(path: str | Path, overrides: list[str], output: str | None = None) -> tuple[Path, dict]:
    """Fit and write; returns (the calibrated checkpoint, its ``calibration`` entry)."""
    run = CheckpointOnSplit.open(path, [*overrides, "inference.calibrated=false"])
    saved, ds, rt, options, class_names = run.saved, run.cfg.dataset, run.runtime, run.analysis, run.class_names
    multilabel = run.inference.multilabel
    target = output_path(saved.path, output)
    parse = parse_channel_objective if multilabel else parse_objective
    objective = parse(options.decision.objective, class_names) if options.decision.tune else None
    split, loader, model = run.read_split().split, run.loader, run.model
    bins = options.calibration.bins or 15
    per_image = max(1, math.ceil(options.calibration.max_pixels / len(split)))
    sample = PixelSample(per_image, ds.ignore_index, options.calibration.seed)
    log.info("%s on %s (%d images): pass 1, sampling up to %d labelled pixels per image", saved.path,
             fitted_on(split)["name"], len(split), per_image)
    before = measure(model, loader, rt, {"none": None}, ds.num_classes, ds.ignore_index, bins, sample,
                     multilabel)["none"]
    logits, labels = sample.tensors()
    temperature = (fit_shared_temperature if multilabel else fit_temperature)(logits, labels)
    if not 0.1 <= temperature <= 10:
        log.warning("temperature %.4g, far from 1: the model's logits carry little of what the labels say (a model "
                    "that has barely trained?); the bias, if tuned, acts on logits divided by it", temperature)
    k = logits.shape[1]
    bias = torch.zeros(k)
    guard = objective is not None and objective.text in ("mDice", "mIoU") and not multilabel \
        and options.decision.max_drop is not None  # a mean can be bought by switching a class off
    if guard:
        # the guard's reference: each class's score on the sample with no bias (the temperature changes no label)
        objective = guarded(objective, confusion(labels, predict(logits, torch.zeros(k, device=logits.device)), k),
                            options.decision.max_drop)
    if objective is not None:
        bias, start, best = (tune_thresholds if multilabel else tune_bias)(logits / temperature, labels, objective)
        log.info("bias %s: %s %.4f -> %.4f on the %d sampled pixels", [round(b, 3) for b in bias.tolist()],
                 objective.text, start, best, len(labels))
    calibrations = {"temperature": LogitCalibration(temperature, torch.zeros(k)),
                    "calibrated": LogitCalibration(temperature, bias)}
    after = measure(model, loader, rt, calibrations, ds.num_classes, ds.ignore_index, bins, multilabel=multilabel)
    loss = channel_nll if multilabel else nll
    if multilabel and objective is not None:
        bias = _keep_thresholds_that_help(bias, objective, after["temperature"][0], after["calibrated"][0],
                                          class_names)
    elif objective is not None and float(objective(after["calibrated"][0])) < float(objective(before[0])):
        log.warning("the bias lowers %s on the whole split (the sample was smaller than it): dropped", objective.text)
        bias = torch.zeros(k)
        after["calibrated"] = after["temperature"]
    for name in switched_off(before[0], after["calibrated"][0], class_names) if objective is not None else ():
        log.warning("%s is (nearly) switched off by the tuned decision: under 1%% of its predicted pixels on %s "
                    "remain; raise decision.max_drop only if that is wanted", name, fitted_on(split)["name"])
    entry = {
        "temperature": temperature, "bias": [float(b) for b in bias], "fitted_on": fitted_on(split),
        "objective": objective.text if objective is not None else None, "pixels": int(len(labels)),
        "max_drop": options.decision.max_drop if guard else None,
        "nll": [loss(logits, labels), loss(logits, labels, temperature)],
        "ece": [before[1].ece(), after["temperature"][1].ece()],
        "class_ece": [before[1].class_ece().tolist(), after["temperature"][1].class_ece().tolist()],
        "objective_value": [float(objective(before[0])), float(objective(after["calibrated"][0]))]
        if objective is not None else None,
    }
    if multilabel:  # the bias as what it is: each channel's threshold on its temperature-scaled probability
        entry.update(multilabel=True, thresholds=thresholds_of(bias))
    if options.postprocess.tune:  # on the labels as the calibrated checkpoint will give them
        entry["postprocess"] = tune_rules(run, LogitCalibration(temperature, bias), multilabel)
    ckpt = load_checkpoint(saved.path)
    ckpt["calibration"] = entry
    save_checkpoint(ckpt, target)
    note_calibration(target, entry, class_names)  # the run's model_card.md, when target is in a run directory
    _print_summary(entry, before[0], after["calibrated"][0], class_names, target)
    return target, entry


def tune_rules(run: CheckpointOnSplit, calibration: LogitCalibration, multilabel: bool) -> dict:
    """Per-class component rules tuned on the run's split (``segtrain.analysis.postprocess``), printed with what was
    tried; the calibration entry's ``postprocess`` (the rules, how they were chosen, the split)."""
    pp, ds, names = run.analysis.postprocess, run.cfg.dataset, run.class_names
    unknown = sorted(set(pp.classes or ()) - set(names))
    if unknown:
        raise ValueError(f"postprocess.classes: {unknown} are not classes of the model ({', '.join(names)})")
    classes = None if pp.classes is None else [names.index(name) for name in pp.classes]
    samples = split_predictions(run.model, run.loader, run.runtime, calibration, multilabel)
    log.info("tuning component rules on %d images of %s", len(samples), fitted_on(run.split)["name"])
    rules, candidates = (tune_channels if multilabel else tune)(
        samples, ds.num_classes, ds.ignore_index, connectivity=pp.connectivity, min_size_grid=pp.min_size_grid,
        max_hole_grid=pp.max_hole_grid, try_keep_largest=pp.keep_largest, objective=pp.objective,
        tolerance=pp.tolerance, classes=classes, min_gain=pp.min_gain)
    print(report_table(candidates, names))
    return {**rules.to_dict(names), "objective": pp.objective, "tolerance": pp.tolerance, "min_gain": pp.min_gain,
            "fitted_on": fitted_on(run.split), "accepted": sum(c.accepted for c in candidates),
            "tried": len(candidates)}


def _keep_thresholds_that_help(bias: torch.Tensor, objective, before: torch.Tensor, after: torch.Tensor,
                               class_names: list[str]) -> torch.Tensor:
    """Multi-label: a channel whose tuned threshold scores lower than 0.5 on the whole split (possible only when the
    sample was smaller than it) goes back to 0.5; ``before`` (C, 2, 2) is the split under the temperature alone,
    ``after`` with the thresholds too, updated to match. Channels are decided apart, so one channel's reset changes
    no other's counts."""
    bias = bias.clone()
    for c in objective.channels:
        score = objective.per_channel[c]
        if float(score(after[c])) < float(score(before[c])):
            log.warning("the threshold of %s lowers %s on the whole split (the sample was smaller than it): back to "
                        "0.5", class_names[c], objective.text)
            bias[c] = 0.0
            after[c] = before[c]
    return bias


def _print_summary(entry: dict, before: torch.Tensor, after: torch.Tensor, class_names: list[str],
                   target: Path) -> None:
    where = entry["fitted_on"]["name"]
    print(f"fitted on {where}, {entry['pixels']} sampled pixels (numbers below are on that split: not a final score)")
    ece = "ECE, every channel's entries pooled," if entry.get("multilabel") else "top-label ECE"
    print(f"temperature {entry['temperature']:.4f}: NLL {entry['nll'][0]:.4f} -> {entry['nll'][1]:.4f} (sample), "
          f"{ece} {entry['ece'][0]:.4f} -> {entry['ece'][1]:.4f} (whole split)")
    for name, b, a in zip(class_names, *entry["class_ece"]):
        print(f"  ECE {name}: {b:.4f} -> {a:.4f}")
    if entry["objective"] is not None and entry.get("multilabel"):
        print(f"thresholds {[round(t, 4) for t in entry['thresholds']]} (on the temperature-scaled probability; "
              f"0.5 = untuned): {entry['objective']} {entry['objective_value'][0]:.4f} -> "
              f"{entry['objective_value'][1]:.4f} (whole split)")
        print(channel_table(before, after, class_names, entry["thresholds"]))
    elif entry["objective"] is not None:
        bias = entry["bias"]
        print(f"bias {[round(b, 4) for b in bias]}: {entry['objective']} {entry['objective_value'][0]:.4f} -> "
              f"{entry['objective_value'][1]:.4f} (whole split)")
        if len(class_names) == 2:  # as a threshold on the temperature-scaled probability of the second class
            d = bias[1] - bias[0]
            print(f"  = {class_names[1]} where p({class_names[1]}) >= {1 / (1 + math.exp(d)):.4f} (was 0.5)")
        print(per_class_table(before, after, class_names))
    print(f"wrote {target}; score it on a held-out split: python -m segtrain.evaluate checkpoint={target} "
          "dataset.split=<split> (or dataset.root=<other data>)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    outputs = [a.split("=", 1)[1] for a in argv if a.startswith("output=")]
    if len(paths) != 1 or len(outputs) > 1:
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    overrides = [a for a in argv if not a.startswith(("checkpoint=", "output="))]
    try:
        calibrate(paths[0], overrides, outputs[0] if outputs else None)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
