"""The model classes a checkpoint may name: segtrain's own, and those a user registers in code.

A checkpoint's stored config names its model by a registered name (the ``_target_`` the model configs write,
``segtrain.models.UNet``), which is looked up here and called with plain arguments; what else a file's config
may hold is ``segtrain.config.trust``'s to check.

    register_model(MyNet)      # under "mypkg.nets.MyNet", the name its configs' _target_ gives
    model = build_model({"_target_": "segtrain.models.UNet", "num_classes": 3, "encoder": "resnet18"})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate

from segtrain.models.deeplabv3plus import DeepLabV3Plus
from segtrain.models.unet import UNet

# Keys of the model config that configure training around the model, not the model class.
MODEL_TRAINING_KEYS = ("sync_bn",)

_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "segtrain.models.UNet": UNet,
    "segtrain.models.DeepLabV3Plus": DeepLabV3Plus,
}


def register_model(cls: Callable[..., torch.nn.Module], name: str | None = None) -> Callable[..., torch.nn.Module]:
    """Make ``cls`` buildable from a checkpoint whose ``model._target_`` is ``name`` (default: its import path,
    ``module.QualName``, which is what a ``model._target_`` names). Usable as a decorator."""
    _MODELS[name or f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def registered_models() -> list[str]:
    return list(_MODELS)


def is_registered(name: Any) -> bool:
    return name in _MODELS


def build_model(options: dict[str, Any]) -> torch.nn.Module:
    """The model ``options["_target_"]`` names, called with the other keys (not ``sync_bn``). A registered name
    is called directly with plain arguments; any other target (typed by the user, never read from a file:
    ``check_file_config``) goes through Hydra as in any Hydra app."""
    options = {k: v for k, v in options.items() if k not in MODEL_TRAINING_KEYS}
    cls = _MODELS.get(options.get("_target_"))
    if cls is None:
        return instantiate(options)
    return cls(**{k: v for k, v in options.items() if k != "_target_"})
