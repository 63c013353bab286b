"""Per-class rules on a label map against rare classes' speckle (small false islands) and holes, tuned on a split.

A pixel a class gives up takes its next most probable class (``top_two``'s second; 0 when not known). ``tune`` keeps
a rule only if its class's score rises and no other class's drops by more than ``tolerance`` (nnU-Net's rule).
Labelling 2048x2048 (3419 components, 2 cores): cv2.connectedComponents 2.5 ms, scipy 7.5, cv2 WithStats 17-26."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import torch

from segtrain.errors import check_choice, check_count, choice_message
from segtrain.metrics import channel_counts, channel_scores, class_argmax, class_scores

GRID = (4, 8, 16, 32, 64, 128, 256)  # pixels: tune's default min_size and max_hole values


@dataclass(frozen=True)
class ClassRules:
    """One class's rules; None / False leave that step out."""

    min_size: int | None = None  # components with fewer pixels are removed
    keep_largest: bool = False  # only the largest component stays (a class that occurs once per image)
    max_hole: int | None = None  # holes of at most this many pixels are filled

    def __post_init__(self) -> None:
        for key in ("min_size", "max_hole"):
            if getattr(self, key) is not None:
                check_count(key, getattr(self, key), "null or a number of pixels")
        if not isinstance(self.keep_largest, bool):
            raise ValueError(f"keep_largest={self.keep_largest!r}: expected true or false")


@dataclass(frozen=True)
class PostProcess:
    """Rules per class index (classes without rules are left as they are); ``connectivity`` 4 or 8 of a class's
    components, holes the other one (a 4-connected hole inside an 8-connected ring, and vice versa)."""

    rules: dict[int, ClassRules]
    connectivity: int = 8

    def to_dict(self, class_names: Sequence[str]) -> dict:
        """JSON-able, rules keyed by class name: ``{"connectivity": 8, "rules": {"spot": {"min_size": 12, ...}}}``."""
        rules = {class_names[c]: dict(vars(rule)) for c, rule in sorted(self.rules.items())}
        return {"connectivity": self.connectivity, "rules": rules}

    @classmethod
    def from_dict(cls, data: Mapping, class_names: Sequence[str]) -> PostProcess:
        """``to_dict``'s form back (other keys of ``data`` are ignored); errors name unknown classes and bad rules."""
        names, rules = list(class_names), {}
        if not isinstance(data, Mapping) or not isinstance(data.get("rules"), Mapping):
            raise ValueError(f"postprocess={data!r}: expected a mapping with 'connectivity' and 'rules'")
        for name, entry in data["rules"].items():
            if name not in names:
                raise ValueError(choice_message("postprocess.rules", name, names, "is not a class of the model"))
            try:  # not a mapping, a rule that is not a ClassRules field, a bad value
                rules[names.index(name)] = ClassRules(**entry)
            except (TypeError, ValueError) as error:
                raise ValueError(f"postprocess.rules.{name}={entry!r}: {error}") from None
        check_choice("postprocess.connectivity", data.get("connectivity", 8), (4, 8))
        return cls(rules, data.get("connectivity", 8))


def top_two(scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) probabilities or logits -> ((H, W) arg-max labels, (H, W) second most probable class), int64
    numpy; the arg-max is ``class_argmax``'s (first maximum on ties), the second the first maximum of the rest."""
    if scores.dim() != 3 or scores.shape[0] < 2:
        raise ValueError(f"scores of shape {tuple(scores.shape)}: expected (K, H, W) with K >= 2 classes")
    top = class_argmax(scores[None])[0]
    second = class_argmax(scores.scatter(0, top[None], -math.inf)[None])[0]  # top itself when the rest are -inf
    return top.cpu().numpy().astype(np.int64), second.cpu().numpy().astype(np.int64)


class _Components:
    """A class mask's components for a rule (max_hole: the others', other connectivity), which a value changes."""

    def __init__(self, mask: np.ndarray, rule: str, connectivity: int) -> None:
        hole = rule == "max_hole"
        n, self.labels = cv2.connectedComponents(np.ascontiguousarray(~mask if hole else mask, dtype=np.uint8),
                                                 connectivity=12 - connectivity if hole else connectivity)
        self.rule, self.area, self.border = rule, np.bincount(self.labels.ravel(), minlength=n), np.zeros(n, bool)
        self.area[0] = 0  # label 0: the pixels outside the components
        self.border[np.concatenate([self.labels[[0, -1]].ravel(), self.labels[:, [0, -1]].ravel()])] = True

    def chosen(self, value: int | bool) -> np.ndarray:
        """(n,) bool: the components the rule at ``value`` fills (max_hole) or removes (min_size, keep_largest)."""
        if self.rule == "max_hole":
            out = ~self.border & (self.area <= value)
        elif self.rule == "min_size":
            out = self.area < value
        else:  # keep_largest: of equal largest, the one whose first pixel in raster order comes first stays
            out = np.full(len(self.area), bool(value) and len(self.area) > 2)
            if out.any():
                ties = np.flatnonzero(self.area == self.area.max())
                out[min(ties, key=lambda k: int(np.argmax(self.labels.ravel() == k)))] = False
        out[0] = False
        return out


def _rule_mask(mask: np.ndarray, rule: ClassRules, connectivity: int) -> np.ndarray:
    """The class's pixels after its rules: holes filled, then small components removed, then all but the largest."""
    for name, value in (("max_hole", rule.max_hole), ("min_size", rule.min_size), ("keep_largest", rule.keep_largest)):
        if value is not None and value is not False and mask.any():
            comps = _Components(mask, name, connectivity)
            changed = comps.chosen(value)[comps.labels]
            mask = mask | changed if name == "max_hole" else mask & ~changed
    return mask


def _fallback(before: np.ndarray, labels: np.ndarray, second: np.ndarray | None, c: int) -> np.ndarray:
    """What pixels become when class c's rules leave them out: their value before these rules if not c (a filled
    hole removed again), else ``second`` where the arg-max is c, else 0 (the third class is not known)."""
    nxt = 0 if second is None else np.where(second != c, second, 0)
    return np.where(before == c, np.where(labels == c, nxt, 0), before).astype(before.dtype, copy=False)


def apply(labels: np.ndarray, second: np.ndarray | None, pp: PostProcess) -> np.ndarray:
    """The rules on one (H, W) label map, class by class in index order (per class: fill holes <= max_hole, remove
    components < min_size, keep the largest); ``second``: each pixel's second most probable class, None -> 0."""
    if labels.ndim != 2 or (second is not None and second.shape != labels.shape):
        raise ValueError(f"labels {labels.shape}, second {getattr(second, 'shape', None)}: expected (H, W), (H, W)")
    out = labels.copy()
    for c in sorted(pp.rules):
        mask = out == c
        if mask.any():
            out = np.where(_rule_mask(mask, pp.rules[c], pp.connectivity), c, _fallback(out, labels, second, c))
    return out.astype(labels.dtype, copy=False)


def apply_channels(masks: np.ndarray, pp: PostProcess) -> np.ndarray:
    """Multi-label: (C, H, W) bool decisions with the rules per channel (keyed by channel index): removed pixels
    become absent, filled holes present."""
    if masks.ndim != 3 or any(c >= len(masks) for c in pp.rules):
        raise ValueError(f"masks {masks.shape}, rules for channels {sorted(pp.rules)}: expected (C, H, W), c < C")
    out = masks.astype(bool, copy=True)
    for c in sorted(pp.rules):
        out[c] = _rule_mask(out[c], pp.rules[c], pp.connectivity)
    return out


@dataclass
class Candidate:
    """One rule value tried: per-class scores (C,) before it (the rules accepted so far) and with it."""

    class_index: int
    rule: str
    value: int | bool
    before: np.ndarray
    after: np.ndarray
    accepted: bool
    why: str


class _Split:
    """The tuning split under the rules accepted so far: [labels, second, truth, prediction] and (K, K) counts."""

    def __init__(self, samples: Sequence, num_classes: int, ignore_index: int) -> None:
        self.k, self.ignore, self.images, self.matrices = num_classes, ignore_index, [], []
        for i, (labels, second, truth) in enumerate(samples):
            labels, truth = np.asarray(labels), np.asarray(truth)
            second = np.zeros_like(labels) if second is None else np.asarray(second)
            if labels.ndim != 2 or not labels.shape == second.shape == truth.shape or not np.isin(
                    labels, range(self.k)).all() or not np.isin(truth, [*range(self.k), ignore_index]).all():
                raise ValueError(f"sample {i}: maps {labels.shape}, {second.shape}, {truth.shape}: expected (H, W) "
                                 f"maps of one shape, classes 0..{self.k - 1} (truth: or {ignore_index})")
            self.images.append([labels, second, truth, labels])
            self.matrices.append(self.count(truth, labels))

    def count(self, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
        k = self.k  # ignored pixels go to an extra row of bins, dropped
        row = np.where(truth == self.ignore, k * k, truth.astype(np.int64) * k).ravel()
        return np.bincount(row + pred.ravel(), minlength=k * k + k)[: k * k].reshape(k, k)

    def change(self, i: int, before: np.ndarray, comps: _Components, value: int | bool, c: int, commit: bool
               ) -> np.ndarray:
        """Image i's (K, K) change by ``value`` of the rule on class c (``before``: ahead of c's rules); ``commit``."""
        labels, second, truth, state = self.images[i]
        chosen = comps.chosen(value)
        if not chosen.any():
            return np.zeros((self.k, self.k), np.int64)
        where = np.flatnonzero(chosen[comps.labels])
        old, truth = state.ravel()[where], truth.ravel()[where]
        new = np.full_like(old, c) if comps.rule == "max_hole" else _fallback(
            before.ravel()[where], labels.ravel()[where], second.ravel()[where], c)
        delta = self.count(truth, new) - self.count(truth, old)
        if commit:
            state = self.images[i][3] = state.copy() if state is before else state
            state.ravel()[where] = new
            self.matrices[i] = self.matrices[i] + delta
        return delta


def _verdict(before: np.ndarray, after: np.ndarray, c: int, tolerance: float, min_gain: float = 0.0) -> str:
    """"accepted" when class c's score rises by > ``min_gain`` (and 1e-9) and no other's drops by > ``tolerance``."""
    if not after[c] - before[c] > max(min_gain, 1e-9):  # NaN: no change
        return f"does not improve class {c} ({before[c]:.4f} -> {after[c]:.4f})"
    drop = np.where(np.arange(len(before)) == c, 0.0, np.nan_to_num(before - after, nan=0.0))
    worst = int(np.argmax(drop))
    return f"lowers class {worst} by {drop[worst]:.4f}" if drop[worst] > tolerance else "accepted"


def _tune_class(split: _Split, c: int, stages: list[tuple[str, list]], connectivity: int, objective: str,
                tolerance: float, min_gain: float) -> tuple[dict, list[Candidate]]:
    """Class c's rules, stage by stage on top of those accepted: (accepted rules, candidates)."""
    before = {i: image[3] for i, image in enumerate(split.images) if (image[3] == c).any()}  # the others: unchanged
    accepted, candidates = {}, []
    for rule, values in stages:
        total = sum(split.matrices, np.zeros((split.k, split.k), np.int64))
        deltas = np.zeros((len(values), *total.shape), np.int64)
        for i in before:
            comps = _Components(split.images[i][3] == c, rule, connectivity)
            for j, value in enumerate(values):
                deltas[j] += split.change(i, before[i], comps, value, c, commit=False)
        start, *trials = class_scores(torch.from_numpy(np.stack([total, *(total + deltas)])))[objective].numpy()
        best = int(np.argmax([-math.inf if math.isnan(t[c]) else t[c] for t in trials])) if values else -1
        for j, (value, after) in enumerate(zip(values, trials)):
            why = _verdict(start, after, c, tolerance, min_gain)
            why = why if j == best or why != "accepted" else f"{rule}={values[best]} is the best value"
            candidates.append(Candidate(c, rule, value, start, after, why == "accepted", why))
        if best >= 0 and candidates[best - len(values)].accepted:
            accepted[rule] = values[best]
            for i in before:
                comps = _Components(split.images[i][3] == c, rule, connectivity)
                split.change(i, before[i], comps, values[best], c, commit=True)
    return accepted, candidates


def _classes(classes: Sequence[int] | None, every: range) -> list[int]:
    chosen = sorted(set(every if classes is None else classes))
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < every.stop for c in chosen):
        raise ValueError(f"classes={classes!r}: expected class indices in 0..{every.stop - 1}")
    return chosen


def tune(samples: Sequence, num_classes: int, ignore_index: int = 255, *, connectivity: int = 8,
         min_size_grid: Sequence[int] = GRID, max_hole_grid: Sequence[int] = GRID, try_keep_largest: bool = True,
         objective: str = "dice", tolerance: float = 0.005, classes: Sequence[int] | None = None,
         min_gain: float = 0.0) -> tuple[PostProcess, list[Candidate]]:
    """Rules tuned on (labels, second, truth) (H, W) maps: per class (all but 0 by default) and rule in tune order,
    the grid value best for the class's own ``objective`` ("dice" | "iou"), kept if ``_verdict`` accepts it (a gain
    of at most ``min_gain`` is the split's noise, not the rule's)."""
    check_choice("objective", objective, ("dice", "iou"))
    check_choice("connectivity", connectivity, (4, 8))
    if not (tolerance >= 0 and min_gain >= 0):
        raise ValueError(f"tolerance={tolerance!r}, min_gain={min_gain!r}: expected score differences >= 0")
    [ClassRules(min_size=v) for v in (*min_size_grid, *max_hole_grid)]  # every value a number of pixels
    stages = [("max_hole", list(max_hole_grid)), ("min_size", list(min_size_grid)),
              ("keep_largest", [True] if try_keep_largest else [])]
    split, rules, candidates = _Split(samples, num_classes, ignore_index), {}, []
    for c in _classes(classes, range(1, num_classes)):
        accepted, tried = _tune_class(split, c, stages, connectivity, objective, tolerance, min_gain)
        candidates += tried
        rules.update({c: ClassRules(**accepted)} if accepted else {})
    return PostProcess(rules, connectivity), candidates


def tune_channels(samples_ml: Sequence, num_classes: int, ignore_index: int = 255, **options: Any
                  ) -> tuple[PostProcess, list[Candidate]]:
    """Multi-label ``tune`` (same options) of ((C, H, W) bool decisions, (C, H, W) truth of 0 / 1 / ignore) samples:
    each channel (all by default) a two-class split; they are decided apart, so a rule must raise its channel only."""
    chosen = _classes(options.pop("classes", None), range(num_classes))
    samples_ml = [(torch.as_tensor(np.asarray(d, bool)), torch.as_tensor(np.asarray(t))) for d, t in samples_ml]
    if any(d.dim() != 3 or d.shape != t.shape or len(d) != num_classes for d, t in samples_ml):
        raise ValueError(f"decisions, truth of shapes {[(d.shape, t.shape) for d, t in samples_ml]}: expected "
                         f"({num_classes}, H, W) both")
    counts = sum(channel_counts(d[None], t[None], ignore_index)[0] for d, t in samples_ml)
    current = channel_scores(counts)[options.get("objective", "dice")].numpy()
    rules, candidates, channel = {}, [], np.arange(num_classes)
    for c in chosen:
        binary = [(d[c].numpy().view(np.uint8), None, t[c].numpy()) for d, t in samples_ml]
        pp, tried = tune(binary, 2, ignore_index, **{**options, "classes": [1], "tolerance": math.inf})
        for cand in tried:  # channel c's scores into every channel's
            candidates.append(replace(cand, class_index=c, why=cand.why.replace("class 1", f"class {c}"),
                                      before=np.where(channel == c, cand.before[1], current),
                                      after=np.where(channel == c, cand.after[1], current)))
            current = candidates[-1].after if cand.accepted else current
        rules.update({c: pp.rules[1]} if pp.rules else {})
    return PostProcess(rules, options.get("connectivity", 8)), candidates


def report_table(candidates: Sequence[Candidate], class_names: Sequence[str]) -> str:
    """Per class: its accepted rules and score before -> after them; then each candidate not accepted and why."""
    names, width, rules = list(class_names), max(8, *(len(n) for n in class_names)), {c: [] for c in class_names}
    start = final = candidates[0].before if candidates else np.full(len(names), math.nan)
    for cand in (c for c in candidates if c.accepted):
        final = cand.after
        rules[names[cand.class_index]].append(f"{cand.rule}={cand.value}")
    lines = [f"{'class':<{width}}  {'rules':<36}  {'before':>6}  ->  {'after':>6}", "-" * (width + 60)]
    lines += [f"{name:<{width}}  {', '.join(rules[name]) or '-':<36}  {start[c]:6.4f}  ->  {final[c]:6.4f}"
              for c, name in enumerate(names)]
    rejected = [(c, re.sub(r"class (\d+)", lambda m: names[int(m[1])], c.why)) for c in candidates if not c.accepted]
    return "\n".join([*lines, "tried and rejected:", *(f"  {names[c.class_index]} {c.rule}={c.value}: {why}"
                                                        for c, why in rejected)])
