"""A weighted sum of loss terms that also reports each term for logging."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from segtrain.losses.cross_entropy import CrossEntropyLoss
from segtrain.losses.dice import DiceLoss
from segtrain.losses.focal import FocalLoss
from segtrain.losses.functional_fused import focal_dice_loss


class CompositeLoss(nn.Module):
    """Sum of ``weight * term(logits, target)``; forward returns a dict for the training loop.

        loss_fn = CompositeLoss({"ce": (CrossEntropyLoss(), 1.0), "dice": (DiceLoss(), 0.5)})
        out = loss_fn(logits, target)
        out["loss"].backward()      # 1.0 * ce + 0.5 * dice
        out["dice"]                 # unweighted and detached, logged as train/loss/dice

    With ``fuse`` (the default), a FocalLoss or unsmoothed CrossEntropyLoss term and a
    non-squared DiceLoss term are computed together by ``functional_fused.focal_dice_loss``:
    one softmax for both, the same values and gradients, about half the time and memory of
    the two apart (scripts/bench_losses.py). ``fuse=False`` computes every term on its own,
    which double backward (``create_graph=True``) needs.
    """

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]], fuse: bool = True) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CompositeLoss needs at least one term, got none")
        modules: dict[str, nn.Module] = {}
        self.weights: dict[str, float] = {}
        for name, term in terms.items():
            if not isinstance(name, str) or not name or "." in name or name == "loss":
                raise ValueError(f"loss term name {name!r} is not valid: use a non-empty name without '.', not 'loss'")
            module, weight = term
            if not isinstance(module, nn.Module):
                raise TypeError(f"loss term {name!r}: expected an nn.Module, got {type(module).__name__}")
            weight = float(weight)
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"loss term {name!r}: weight must be finite and >= 0, got {weight}")
            modules[name] = module
            self.weights[name] = weight
        self.terms = nn.ModuleDict(modules)
        self.fuse = fuse

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        fused: dict[str, torch.Tensor] = {}
        # Looked up per call: options may change after __init__. (N, C) logits without pixels stay apart.
        pair = fusable_pair(self.terms) if self.fuse and logits.ndim > 2 else None
        if pair is not None:
            pixel, dice = pair
            fused[pixel], fused[dice] = _fused_values(self.terms[pixel], self.terms[dice], logits, target)
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        for name, module in self.terms.items():
            value = fused[name] if name in fused else module(logits, target)
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
            values[name] = value.detach()
        return {"loss": total, **values}

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{name}: {weight}" for name, weight in self.weights.items()) + \
            f", fuse={self.fuse}"


def fusable_pair(terms: Mapping[str, nn.Module]) -> tuple[str, str] | None:
    """Names of a pixel term (focal, or cross-entropy without smoothing) and a Dice term to compute together.

    Exact classes only: a subclass may have changed what its forward computes.
    """
    pixel = next((name for name, m in terms.items() if type(m) is FocalLoss
                  or (type(m) is CrossEntropyLoss and m.label_smoothing == 0)), None)
    dice = next((name for name, m in terms.items() if type(m) is DiceLoss and not m.squared), None)
    if pixel is None or dice is None or terms[pixel].ignore_index != terms[dice].ignore_index:
        return None
    return pixel, dice


def _fused_values(pixel: nn.Module, dice: DiceLoss, logits: torch.Tensor, target: torch.Tensor):
    gamma, normalize = (pixel.gamma, pixel.normalize) if isinstance(pixel, FocalLoss) else (0.0, "weights")
    return focal_dice_loss(logits, target, gamma, pixel.weight, normalize, dice.smooth, dice.batch,
                           dice.include_background, dice.weight, dice.ignore_index)
