"""A weighted sum of loss terms that also reports each term for logging."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from segtrain.losses.fused import FocalDiceLoss, fusable_pair


class CompositeLoss(nn.Module):
    """Sum of ``loss_weight * term(logits, target)``; forward returns a dict for the training loop.

        loss_fn = CompositeLoss({"ce": (CrossEntropyLoss(), 1.0), "dice": (DiceLoss(), 0.5)})
        out = loss_fn(logits, target)
        out["loss"].backward()      # 1.0 * ce + 0.5 * dice
        out["dice"]                 # unweighted and detached, logged as train/loss/dice

    Built by hand like this or by ``build_loss``, a FocalLoss or unsmoothed CrossEntropyLoss
    term and a non-squared DiceLoss term are computed together (``fused.FocalDiceLoss``): one
    softmax for both, the same values and gradients, about half the time and memory. That is
    decided here, once; set the terms' options before building. ``fuse=False`` computes every
    term on its own, which double backward (``create_graph=True``) needs.
    """

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]], fuse: bool = True) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CompositeLoss needs at least one term, got none")
        modules: dict[str, nn.Module] = {}
        self.loss_weights: dict[str, float] = {}
        for name, term in terms.items():
            if not isinstance(name, str) or not name or "." in name or name == "loss":
                raise ValueError(f"loss term name {name!r} is not valid: use a non-empty name without '.', not 'loss'")
            module, loss_weight = term
            if not isinstance(module, nn.Module):
                raise TypeError(f"loss term {name!r}: expected an nn.Module, got {type(module).__name__}")
            loss_weight = float(loss_weight)
            if not math.isfinite(loss_weight) or loss_weight < 0:
                raise ValueError(f"loss term {name!r}: loss_weight must be finite and >= 0, got {loss_weight}")
            modules[name] = module
            self.loss_weights[name] = loss_weight
        self.terms = nn.ModuleDict(modules)
        self.fused = fusable_pair(self.terms) if fuse else None
        # What forward runs, in order: (names of the values, module); a fused module gives two.
        # A plain list: the modules are registered once, in self.terms.
        self._calls: list[tuple[tuple[str, ...], nn.Module]] = []
        for name, module in self.terms.items():
            if self.fused is None or name not in self.fused:
                self._calls.append(((name,), module))
            elif name == self.fused[0]:
                self._calls.append((self.fused, FocalDiceLoss(*(self.terms[n] for n in self.fused))))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for names, module in self._calls:
            out = module(logits, target)
            values.update(zip(names, out if len(names) > 1 else (out,)))
        total: torch.Tensor | None = None
        for name, loss_weight in self.loss_weights.items():  # the terms' order, fused or not
            weighted = loss_weight * values[name]
            total = weighted if total is None else total + weighted
        return {"loss": total, **{name: values[name].detach() for name in self.loss_weights}}

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}: {w}" for name, w in self.loss_weights.items())
        return f"loss_weights={weights}, fused={'+'.join(self.fused) if self.fused else None}"
