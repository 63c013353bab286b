"""A weighted sum of loss terms that also reports each term for logging."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn


class CompositeLoss(nn.Module):
    """Sum of ``weight * term(logits, target)``; forward returns a dict for the training loop.

        loss_fn = CompositeLoss({"ce": (CrossEntropyLoss(), 1.0), "dice": (DiceLoss(), 0.5)})
        out = loss_fn(logits, target)
        out["loss"].backward()      # 1.0 * ce + 0.5 * dice
        out["dice"]                 # unweighted and detached, logged as train/loss/dice
    """

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]]) -> None:
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

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        for name, module in self.terms.items():
            value = module(logits, target)
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
            values[name] = value.detach()
        return {"loss": total, **values}

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{name}: {weight}" for name, weight in self.weights.items())
