"""The base of the loss modules: a module only holds its options; the math is in ``functional*``."""

from __future__ import annotations

from typing import Any

from torch import nn

from segtrain.losses.functional import as_class_weights


class LossModule(nn.Module):
    """Keeps its options as attributes, listed by ``repr``. A ``weight`` option (per-class
    weights) becomes a non-persistent buffer: ``.to(device)`` moves it, and no checkpoint stores
    what the training data rebuilds."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self._option_names = tuple(name for name in options if name != "weight")
        for name, value in options.items():
            if name == "weight":
                self.register_buffer("weight", as_class_weights(value), persistent=False)
            else:
                setattr(self, name, value)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._option_names)
