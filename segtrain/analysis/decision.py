"""A per-class logit bias, tuned after training on a labelled split, that moves the decision boundary.

Class weights trade a rare class's precision for recall during training; the bias lets the user pick the
trade-off afterwards: ``argmax(logits / T + b)``. ``tune_bias`` is a coordinate search on a pixel sample
(``calibration.PixelSample``): for one class at a time, every value of a grid around its current bias is
scored at once, exactly (below), and the best is kept only if it beats the current objective; rounds
repeat until one changes nothing. Starting from b = 0, the objective on the sample can only go up.

For class c and the other classes' best ``o = argmax_{k != c}(z_k + b_k)``, a pixel is predicted c exactly
when ``z_c + b_c > z_o + b_o``, i.e. when ``b_c > -(z_c - z_o - b_o)``: each pixel's margin falls into one
grid interval, one bincount of (interval, true class, o) gives, by a cumulative sum, the confusion matrix at
every grid value. Objectives (``decision.objective``): ``mDice``, ``mIoU``, ``dice/<class>``, ``iou/<class>``,
``recall/<class>@precision>=<p>`` (the recall when the precision reaches p; below p the precision minus 1,
so the search climbs towards p first).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from segtrain.errors import choice_message
from segtrain.metrics import class_argmax, class_scores

GRID = torch.linspace(-8.0, 8.0, 321)  # offsets from a class's current bias, steps of 0.05
MAX_ROUNDS = 6
_RECALL_AT = re.compile(r"^recall/(?P<cls>.+)@precision>=(?P<p>[0-9.]+)$")


def confusion(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class."""
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Objective:
    """A number to maximise from confusion matrices: ``objective(matrices (..., K, K)) -> (...)``."""

    text: str
    score: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, matrices: torch.Tensor) -> torch.Tensor:
        return self.score(matrices)


def parse_objective(text: str, class_names: Sequence[str]) -> Objective:
    """``decision.objective`` as an ``Objective``; an unknown metric or class is an error naming the options."""
    names = list(class_names)
    options = ["mDice", "mIoU", *(f"{m}/{c}" for m in ("dice", "iou") for c in names),
               *(f"recall/{c}@precision>=<p>" for c in names)]
    if text in ("mDice", "mIoU"):
        metric = "dice" if text == "mDice" else "iou"
        return Objective(text, lambda m: class_scores(m)[metric].nanmean(-1).nan_to_num(0.0))
    metric, _, cls = text.partition("/")
    if metric in ("dice", "iou") and cls in names:
        c = names.index(cls)
        return Objective(text, lambda m: class_scores(m)[metric][..., c].nan_to_num(0.0))
    match = _RECALL_AT.match(text)
    if match and match["cls"] in names:
        c, floor = names.index(match["cls"]), float(match["p"])
        if not 0 < floor <= 1:
            raise ValueError(f"decision.objective={text!r}: the precision must be in (0, 1]")

        def recall_at(m: torch.Tensor) -> torch.Tensor:
            s = class_scores(m)
            precision, recall = s["precision"][..., c].nan_to_num(0.0), s["recall"][..., c].nan_to_num(0.0)
            return torch.where(precision >= floor, recall, precision - 1.0)

        return Objective(text, recall_at)
    raise ValueError(choice_message("decision.objective", text, options, "is not an objective"))


def guarded(objective: Objective, reference: torch.Tensor, max_drop: float) -> Objective:
    """``objective`` where no class's own score (IoU for an IoU objective, else Dice) is more than ``max_drop``
    below its score in ``reference`` (the (K, K) matrix at no bias), -inf where one is: the search then never
    buys the mean by switching a class off. A class without a score in the reference (absent) is not guarded."""
    metric = "iou" if "iou" in objective.text.lower() else "dice"
    floor = class_scores(reference)[metric] - max_drop  # (K,), NaN where undefined

    def score(matrices: torch.Tensor) -> torch.Tensor:
        scores = class_scores(matrices)[metric].nan_to_num(0.0)
        ok = ((scores >= floor.to(scores.device)) | floor.isnan().to(scores.device)).all(-1)
        return torch.where(ok, objective(matrices), torch.full_like(objective(matrices), -math.inf))

    return Objective(objective.text, score)  # the name the user gave: the guard is recorded beside it


def switched_off(before: torch.Tensor, after: torch.Tensor, class_names: Sequence[str], share: float = 0.01
                 ) -> list[str]:
    """Classes predicted on the split before the bias whose predicted pixels fell to under ``share`` of that;
    ``before``/``after``: (K, K) confusion matrices, or a multi-label model's (C, 2, 2) per-channel ones."""
    def predicted(m: torch.Tensor) -> torch.Tensor:  # columns: the predicted class (multi-label: present)
        return m[..., 1].sum(-1) if m.dim() == 3 else m.sum(-2)

    predicted_before, predicted_after = predicted(before), predicted(after)
    return [name for name, b, a in zip(class_names, predicted_before.tolist(), predicted_after.tolist())
            if b > 0 and a < share * b]


def predict(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(P,) ``argmax(logits + bias)`` of (P, K) logits (the first maximum on ties, as inference takes it)."""
    return class_argmax(logits + bias)


def _matrices_over_grid(logits: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor, c: int,
                        values: torch.Tensor) -> torch.Tensor:
    """(G, K, K) confusion matrices of ``argmax(logits + bias')`` for bias' = bias with b_c = each of ``values``
    (ascending)."""
    k = logits.shape[1]
    others = (logits + bias).clone()
    others[:, c] = -math.inf
    best_other, o = others.max(dim=1)  # the prediction when c is not chosen
    # Predicted c at value v exactly when v > threshold; values[g] > threshold for g >= bucketize(threshold).
    threshold = best_other - logits[:, c]
    first = torch.bucketize(threshold, values, right=True)  # (P,) in [0, G]
    g = len(values)
    switched = torch.bincount((first * k + labels) * k + o, minlength=(g + 1) * k * k).reshape(g + 1, k, k)
    switched = switched.cumsum(0)[:g]  # (G, K, K): pixels predicted c at each value, by (true, other)
    base = confusion(labels, o, k)  # every pixel at its other class
    matrices = base - switched
    matrices[:, :, c] += switched.sum(-1)
    return matrices


def tune_bias(logits: torch.Tensor, labels: torch.Tensor, objective: Objective,
              grid: torch.Tensor = GRID, max_rounds: int = MAX_ROUNDS) -> tuple[torch.Tensor, float, float]:
    """(bias (K,), objective at b = 0, objective at the bias) on (P, K) logits and their labels."""
    k = logits.shape[1]
    bias = torch.zeros(k, device=logits.device)
    grid = grid.to(logits.device)
    start = best = float(objective(confusion(labels, predict(logits, bias), k)))
    for _ in range(max_rounds):
        changed = False
        for c in range(k):
            values = bias[c] + grid
            scores = objective(_matrices_over_grid(logits, labels, bias, c, values))
            g = int(scores.argmax())
            if float(scores[g]) > best + 1e-12:
                trial = bias.clone()
                trial[c] = values[g]
                # The grid count's ties (z_c + b_c == z_o + b_o) may differ from argmax's first-index rule:
                # keep a value only if the exact prediction agrees it is better.
                exact = float(objective(confusion(labels, predict(logits, trial), k)))
                if exact > best + 1e-12:
                    bias, best, changed = trial, exact, True
        if not changed:
            break
    return bias, start, best


def per_class_table(before: torch.Tensor, after: torch.Tensor, class_names: Sequence[str]) -> str:
    """Precision / recall / Dice per class from two confusion matrices, side by side."""
    b, a = class_scores(before), class_scores(after)
    width = max(8, *(len(n) for n in class_names))
    head = f"{'class':<{width}}  {'prec':>6} {'recall':>6} {'Dice':>6}  ->  {'prec':>6} {'recall':>6} {'Dice':>6}"
    rows = [head, "-" * len(head)]
    for c, name in enumerate(class_names):
        cells = [f"{float(s[m][c]):6.4f}" for s in (b, a) for m in ("precision", "recall", "dice")]
        loss = float(b["dice"][c]) - float(a["dice"][c])
        mark = f"  <- loses {loss:.4f} Dice" if loss > 1e-4 else ""  # the classes that pay for the mean
        rows.append(f"{name:<{width}}  {' '.join(cells[:3])}  ->  {' '.join(cells[3:])}{mark}")
    return "\n".join(rows)
