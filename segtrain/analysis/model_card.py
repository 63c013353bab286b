"""The model card, ``<run>/checkpoints/model_card.md``: what a checkpoint is, what it learnt from and how, how well
it does, where it fails and how to make it again, read from the run directory's files (config.yaml, metrics.json, the
checkpoint, ``eval/<val split>/per_image.csv``), never recomputed. ``write_model_card(run_dir)`` at the end of
training; calibrate and export rewrite their own section (``update_model_card``). Scores have 4 decimals ("nan":
undefined), counts thousands separators ("n/a": not recorded), in Markdown tables of one header row, after a
``Table: ...`` line where a section has several: a reader and a test parse the same numbers.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import segtrain
from segtrain.atomic import atomic_write
from segtrain.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
CARD, CALIBRATION, EXPORTS = "model_card.md", "Calibration and decision", "Exports"
SCORES = {"dice": "Dice", "iou": "IoU", "precision": "precision", "recall": "recall", "ece": "ECE"}
MEANS = ("mDice", "mIoU", "pixel_acc", "ece", "loss")
CARD_ERRORS = (OSError, ValueError, KeyError, TypeError)  # a card that cannot be written: a warning, never a failure


def score(value: float | None) -> str:
    return "n/a" if value is None else "nan" if math.isnan(value) else f"{value:.4f}"


def count(value: int | None) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def _row(values: list[Any]) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table of one header row, and the blank line after it."""
    return [_row(header), "|" + "|".join("---" for _ in header) + "|", *map(_row, rows), ""]


def _rel(run_dir: Path, path: Path) -> str:
    """``path`` as the card names it: relative to ``run_dir`` when inside it, else as given."""
    path, run_dir = Path(path), Path(run_dir).absolute()
    return str(path.absolute().relative_to(run_dir)) if path.absolute().is_relative_to(run_dir) else str(path)


@dataclass
class _Run:
    """The files of a run directory a card is written from, read once."""

    dir: Path
    cfg: dict
    metrics: dict
    names: list[str]
    path: Path  # the checkpoint the card is of
    ckpt: dict
    per_image: list[dict] | None  # per_image.csv's rows, when there

    @classmethod
    def read(cls, run_dir: Path, checkpoint: Path | None) -> _Run:
        for name in ("config.yaml", "metrics.json"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(f"{run_dir / name}: not found; a model card is written from the run directory "
                                        "of a finished python -m segtrain (config.yaml, metrics.json, checkpoints/)")
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if not isinstance(metrics, dict) or "class_names" not in metrics or "final" not in metrics:
            raise ValueError(f"{run_dir / 'metrics.json'}: expected class_names and final (write_metrics_json's)")
        found = [p for p in (run_dir / "checkpoints" / n for n in ("best.pt", "last.pt")) if p.is_file()]
        path = Path(checkpoint) if checkpoint is not None else found[0] if found else run_dir / "checkpoints/last.pt"
        rows, ckpt = run_dir / "eval" / str(cfg["dataset"]["val_split"]) / "per_image.csv", load_checkpoint(path)
        per_image = list(csv.DictReader(rows.read_text().splitlines())) if rows.is_file() else None
        for key in ("class_pixels", "class_pixel_share", "class_images"):  # not in the metrics.json of older runs
            metrics[key] = metrics.get(key) or [None] * len(metrics["class_names"])
        return cls(run_dir, cfg, metrics, list(metrics["class_names"]), path, ckpt, per_image)


def _model(run: _Run) -> list[str]:
    model, state = run.cfg["model"], run.ckpt.get("train_state", {})
    output = "one sigmoid per channel (multi-label)" if run.metrics.get("multilabel") else "softmax over the classes"
    return table(["field", "value"], [
        ["model", model.get("_target_")], ["encoder", model.get("encoder")],
        ["encoder weights", model.get("encoder_weights")], ["classes", f"{len(run.names)}: {', '.join(run.names)}"],
        ["output", output], ["checkpoint", _rel(run.dir, run.path)], ["step", count(state.get("step"))],
        ["segtrain", segtrain.__version__]])


def _data(run: _Run) -> list[str]:
    ds, m = run.cfg["dataset"], run.metrics
    sizes, multilabel = m.get("split_sizes") or {}, m.get("multilabel")
    lines = [f"Dataset `{ds.get('name')}`, layout `{ds.get('layout')}`, root `{ds.get('root')}`.", ""]
    lines += table(["split", "images"], [[split, count(n)] for split, n in sizes.items()]) if sizes else []
    share = "share of the channel's valid pixels" if multilabel else "share of labelled pixels"
    rows = [[name, count(p), score(s), count(i)] for name, p, s, i in zip(
        run.names, m["class_pixels"], m["class_pixel_share"], m["class_images"])]
    lines += [f"Table: per class, on the training split `{ds.get('train_split')}`"
              + (" (a channel's pixels: its positive ones)" if multilabel else ""), ""]
    return lines + table(["class", "training pixels", share, "training images"], rows)


def _recipe(run: _Run) -> list[str]:
    cfg, m = run.cfg, run.metrics
    opt, sched, tr, wcfg = cfg["optimizer"], cfg["scheduler"], cfg["trainer"], cfg["weights"]
    terms = (f"{name} ({', '.join(f'{k} {v}' for k, v in (options or {}).items())})"
             for name, options in cfg["loss"]["terms"].items())
    rows = [["loss", " + ".join(terms)], ["class weights", f"{m.get('weights_strategy', wcfg.get('strategy'))} "
                                         f"(normalize {wcfg.get('normalize')}, max_weight {wcfg.get('max_weight')})"],
            ["optimizer", f"{opt.get('_target_')}, lr {opt.get('lr')}, weight decay {opt.get('weight_decay')}"],
            ["scheduler", f"{sched.get('name')}, {sched.get('warmup_steps', 0)} warm-up steps"],
            ["trained", f"steps {count(m.get('steps'))}, epochs {count(m.get('epochs'))}"],
            ["batch size", f"{tr['batch_size']} per rank x {tr.get('grad_accum', 1)} accumulation steps x "
                           f"{m.get('world_size', 1)} ranks"],
            ["seed", cfg.get("seed")], ["precision", f"trainer.amp={tr.get('amp')}"],
            ["EMA", f"decay {tr['ema']['decay']}" if (tr.get("ema") or {}).get("decay") else "none"]]
    weights = list(map(float, run.ckpt.get("class_weights", []))) or [None] * len(run.names)  # tensor: no `or`
    return (table(["setting", "value"], rows) + ["Table: the class weights the losses used (from the checkpoint)", ""]
            + table(["class", "class weight"], [[n, score(w)] for n, w in zip(run.names, weights)]))


def _results(run: _Run) -> list[str]:
    m, split = run.metrics, run.cfg["dataset"]["val_split"]
    final, best, last_step = m["final"], m.get("best") or {}, m.get("steps")
    same = best.get("step") == last_step
    sources = [("final", final, f"last.pt{' = best.pt' if best and same else ''}, step {count(last_step)}: "
                                "the final evaluation (metrics.json `final`)")]
    if best and not same:
        sources.append(("best", best, f"best.pt, step {count(best.get('step'))}: the best {m.get('monitor')} "
                                      "(metrics.json `best`)"))
    lines = [f"On `{split}` ({count((m.get('split_sizes') or {}).get(split))} images), without calibration.", ""]
    for _, values, label in sources:
        rows = [[n, *(score(values.get(f"val/{key}/{n}")) for key in SCORES)] for n in run.names]
        lines += [f"Table: {label}", ""] + table(["class", *SCORES.values()], rows)
    lines += ["Table: over the classes (means) and all pixels", ""] + table(
        ["metric", *(name for name, _, _ in sources)],
        [[key, *(score(values.get(f"val/{key}")) for _, values, _ in sources)] for key in MEANS])
    step = run.ckpt.get("train_state", {}).get("step")
    own = [name for name, values, _ in sources if values.get("step", last_step) == step]
    held = f"the `{own[0]}` scores are its own" if own else "none of these is its own evaluation"
    return lines + [f"This card's checkpoint, {run.path.name}, holds step {count(step)}: {held}."]


def calibration_text(run_dir: Path, checkpoint: Path, entry: dict | None, class_names: list[str]) -> str:
    """The "Calibration and decision" section of ``checkpoint``, whose ``calibration`` entry is ``entry``."""
    name = _rel(run_dir, checkpoint)
    if not entry:
        command = shlex.join(["python", "-m", "segtrain.calibrate", f"checkpoint={checkpoint}", "decision.tune=true"])
        return (f"{name} is uncalibrated: its probabilities are those of its raw logits, its decision the argmax "
                "(multi-label: each channel's probability > 0.5). "
                f"Fit a temperature and a decision bias on a labelled split with:\n\n```bash\n{command}\n```")
    where, objective, value = entry.get("fitted_on") or {}, entry.get("objective"), entry.get("objective_value")
    ece, thresholds = entry.get("ece") or [None, None], entry.get("thresholds")
    rows = [["checkpoint", name], ["temperature", score(entry["temperature"])],
            ["fitted on", f"{where.get('name')} (split {where.get('split')}, root {where.get('root')})"],
            ["objective", f"{objective}: {score(value[0])} -> {score(value[1])}" if objective else "none (no bias)"],
            ["ECE", f"{score(ece[0])} -> {score(ece[1])}"], ["sampled pixels", count(entry.get("pixels"))]]
    class_ece = entry.get("class_ece") or [[None] * len(entry["bias"])] * 2
    header = ["class", "bias", *(["threshold"] if thresholds else []), "ECE before", "ECE after"]
    per_class = [[class_names[c] if c < len(class_names) else c, score(bias),
                  *([score(thresholds[c])] if thresholds else []), score(class_ece[0][c]), score(class_ece[1][c])]
                 for c, bias in enumerate(entry["bias"])]
    return "\n".join(table(["field", "value"], rows) + ["Table: per class", ""] + table(header, per_class) + [
        f"predict, evaluate and export apply logits / temperature + bias from {name} (inference.calibrated=false: "
        "not); the Results above are without it. The numbers here are on the split it was fitted on: optimistic."])


def _hard_cases(run: _Run, k: int) -> list[str]:
    source = run.dir / "eval" / str(run.cfg["dataset"]["val_split"]) / "per_image.csv"
    if run.per_image is None:
        return [f"No {_rel(run.dir, source)}: the run wrote no per-image report."]
    root, rows = Path(str(run.cfg["dataset"].get("root"))), []
    for name in run.names:  # sorted is stable: ties keep the file's order, as report.md's
        scored = sorted(((float(r["dice"]), r["image"]) for r in run.per_image if r["class"] == name and r["dice"]),
                        key=lambda pair: pair[0])
        rows += [[name, rank, _rel(root, Path(image)), score(dice)] for rank, (dice, image) in enumerate(scored[:k], 1)]
    return [f"Per class, the {k} images of `{source.parent.name}` with the lowest Dice where the class is in the truth "
            f"or the prediction (none: no row), from {_rel(run.dir, source)}: the final evaluation of last.pt.", ""
            ] + table(["class", "rank", "image", "Dice"], rows)


def _limits(run: _Run, min_images: int, min_pixels: int, min_dice: float) -> list[str]:
    ds, m, aug = run.cfg["dataset"], run.metrics, run.cfg["dataset"].get("augment") or {}
    kind = "multi-label (overlapping channels)" if m.get("multilabel") else "semantic"
    lines = [f"- Made for {kind} segmentation of {', '.join(run.names)} in images like the "
             f"{count(sum((m.get('split_sizes') or {}).values()) or None)} of `{ds.get('name')}`; elsewhere its "
             "scores say nothing."]
    for name, images, pixels in zip(run.names, m["class_images"], m["class_pixels"]):
        if (images is not None and images < min_images) or (pixels is not None and pixels < min_pixels):
            lines.append(f"- **{name}: too few to trust**: {count(pixels)} training pixels in {count(images)} training "
                         f"images (fewer than {count(min_pixels)} pixels or {count(min_images)} images).")
        dice = m["final"].get(f"val/dice/{name}")
        if dice is None or math.isnan(dice):
            lines.append(f"- **{name}: no val Dice** (nan: in no val image and never predicted): quality unknown.")
        elif dice < min_dice:
            lines.append(f"- **{name}: val Dice {score(dice)}** (below {min_dice}): not segmented yet.")
    crop, scale, size = aug.get("crop_size"), aug.get("scale_range"), (ds.get("generate") or {}).get("size")
    trained = (f"random {crop} crops" if crop else "whole images (no crop)") + (
        f" of generated {size} px images" if str(ds.get("name")).startswith("synthetic") else "")
    evaluated = f"resized to {ds['val_resize']}" if ds.get("val_resize") else "at each image's own size"
    lines.append(f"- Resolution: trained on {trained}" + (f", rescaled by a factor in {scale}" if scale else "")
                 + f"; evaluated {evaluated}.")
    return lines + [f"- The scores are on `{ds.get('val_split')}`, the split the run watched and chose best.pt on "
                    f"({m.get('monitor')}): optimistic. Score held-out data: python -m segtrain.evaluate "
                    f"checkpoint={run.path} dataset.split=<split> (or dataset.root=<other data>)."]


def _reproduce(run: _Run) -> list[str]:
    train = " ".join(["python -m segtrain", shlex.join(map(str, run.ckpt.get("overrides") or []))]).strip()
    evaluate = shlex.join(["python", "-m", "segtrain.evaluate", f"checkpoint={run.path}"])
    return [f"With segtrain {segtrain.__version__}; the resolved config is {_rel(run.dir, run.dir / 'config.yaml')}.",
            "", "```bash", train, evaluate, "```"]


def write_model_card(run_dir: str | Path, checkpoint: str | Path | None = None, *, min_images: int = 5,
                     min_pixels: int = 1000, min_dice: float = 0.1, worst_k: int = 3) -> Path:
    """``<run_dir>/checkpoints/model_card.md`` of ``checkpoint`` (default best.pt, else last.pt), written atomically.
    A class with fewer than ``min_images`` training images or ``min_pixels`` training pixels is flagged "too few to
    trust", one whose val Dice is nan or below ``min_dice`` flagged too; ``worst_k`` hard cases per class."""
    run = _Run.read(Path(run_dir), Path(checkpoint) if checkpoint is not None else None)
    calibration = calibration_text(run.dir, run.path, run.ckpt.get("calibration"), run.names)
    sections = {"Model": _model(run), "Data": _data(run), "Training recipe": _recipe(run),
                f"Results on {run.cfg['dataset']['val_split']}": _results(run), CALIBRATION: [calibration],
                "Hard cases": _hard_cases(run, worst_k), "Intended use and known limits": _limits(
                    run, min_images, min_pixels, min_dice), "Reproduce": _reproduce(run)}
    head = (f"# Model card: {run.dir.absolute().name}\n\nWritten from the run directory {run.dir}: config.yaml, "
            f"metrics.json, {_rel(run.dir, run.path)}" + (", the per-image report" if run.per_image else "") + ".")
    text = _render(head, {name: "\n".join(lines) for name, lines in sections.items()})
    return atomic_write(run.dir / "checkpoints" / CARD, lambda tmp: tmp.write_text(text))


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """(the text before the first ``## `` heading, {heading: body}) in the card's order."""
    parts = re.split(r"^## (.+)\n", text, flags=re.M)
    return parts[0], dict(zip(parts[1::2], parts[2::2]))


def _render(head: str, sections: dict[str, str]) -> str:
    return "\n\n".join([head.strip(), *(f"## {name}\n\n{body.strip()}" for name, body in sections.items())]) + "\n"


def update_model_card(card: str | Path, section: str, text: str) -> Path:
    """``## <section>`` of the card replaced by ``text`` where it stands, or appended at the end; atomically."""
    card = Path(card)
    if not card.is_file():
        raise FileNotFoundError(f"{card}: no model card to update; write_model_card(<run dir>) writes one")
    new = _render((parts := _sections(card.read_text()))[0], {**parts[1], section: text})
    return atomic_write(card, lambda tmp: tmp.write_text(new))


def card_for(checkpoint: str | Path) -> Path | None:
    """The card of the run directory ``checkpoint`` lives in (``<run>/checkpoints/<name>.pt`` beside
    ``<run>/metrics.json``), written first when missing; None outside one, or when it cannot be written (a warning)."""
    folder = Path(checkpoint).absolute().parent
    if folder.name != "checkpoints" or not (folder.parent / "metrics.json").is_file():
        return None
    try:
        return folder / CARD if (folder / CARD).is_file() else write_model_card(folder.parent)
    except CARD_ERRORS as err:
        log.warning("no model card for %s: %s", checkpoint, err)
        return None


def _update_quietly(card: Path | None, section: str, text: Callable[[], str]) -> Path | None:
    """``update_model_card`` for the commands' hooks: a card that cannot be written is a warning, not a failure."""
    try:
        return None if card is None else update_model_card(card, section, text())
    except CARD_ERRORS as err:
        log.warning("model card %s not updated: %s", card, err)
        return None


def note_calibration(checkpoint: Path, entry: dict, class_names: list[str]) -> Path | None:
    """calibrate's hook: the run's card, its "Calibration and decision" section of the calibrated ``checkpoint``."""
    card = card_for(checkpoint)
    return _update_quietly(card, CALIBRATION, lambda: calibration_text(card.parent.parent, checkpoint, entry,
                                                                          class_names))


def note_export(card: Path | None, file: Path, checkpoint: Path, fmt: str, head: str, input_dtype: str,
                verification: str) -> Path | None:
    """export's hook: ``file``'s row in the card's "Exports" table (an older row of the same file replaced)."""
    def text() -> str:
        old = _sections(card.read_text())[1].get(EXPORTS, "").splitlines()
        rows = [line for line in old if line.startswith("| ") and not line.startswith(_row([file])[:-1])][1:]
        rows.append(_row([file, _rel(card.parent.parent, checkpoint), fmt, head, input_dtype, verification]))
        header = table(["file", "checkpoint", "format", "head", "input", "verification"], [])[:2]
        return ("Files exported from this run; each carries this card, as it was before its own row, in its metadata "
                "(`model_card`).\n\n" + "\n".join(header + rows))

    return _update_quietly(card, EXPORTS, text)
