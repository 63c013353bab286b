"""An exponential moving average of the weights (``trainer.ema``), kept as a module of its own.

    ema = WeightEma(model, decay=0.999)
    ...                      # after every optimizer step that updated the model:
    ema.update(model)        # ema <- d * ema + (1 - d) * model, parameters and floating-point buffers
    evaluate(ema.module)     # the averaged weights, never swapped into ``model``

The decay warms up as in timm's ModelEmaV3 (after Crowson's EMA warm-up): the n-th update uses
``d_n = min(decay, 1 - (1 + (n - 1)) ** -power)`` with power 2/3, so the first update copies the
weights and the average does not start out dominated by the random initialisation. Integer buffers
(BatchNorm's ``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def check_decay(decay: float) -> None:
    """trainer.ema.decay: in (0, 1)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"trainer.ema.decay={decay!r}: expected a number in (0, 1), e.g. 0.999, or null (off)")


class WeightEma:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True, power: float = 2 / 3) -> None:
        check_decay(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.power = decay, warmup, power
        self.updates = 0

    def decay_at(self, n: int) -> float:
        """The decay of the ``n``-th update (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + (n - 1)) ** -self.power) if n > 1 else 0.0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)  # of the new weights
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(current.to(averaged.dtype), weight)
            else:
                averaged.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
