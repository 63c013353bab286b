"""What a file's config may hold: a checkpoint is data (STYLE habit 11), never code.

``check_file_config`` refuses a stored config (or stored command line) that holds Hydra's instantiation keys
anywhere but where a segtrain run's config has them, with the values a run stores: ``model._target_`` a
registered model (``segtrain.models.registry``), the optimizer a ``torch.optim`` class, the scheduler
segtrain's. The command line and the configs under configs/ stay the user's own: ``replaced`` names the keys
the user's overrides give, which are therefore not taken from the file.

    check_file_config(tree, overrides, "ckpt.pt", replaced={"model"})   # raises UntrustedConfig
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from segtrain.models.registry import is_registered, registered_models

# Hydra's keys that make ``instantiate`` import and call something.
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# The scheduler a run's config names (the first: the name before the stage folders; old checkpoints hold it).
SCHEDULERS = ("segtrain.optim.build_scheduler", "segtrain.training.optim.build_scheduler")


class UntrustedConfig(ValueError):
    """A file's config names code to run."""


def _allowed(path: str, value: Any) -> bool:
    """Whether a Hydra key at ``path`` with ``value`` is one a segtrain run's config holds."""
    if path == "model._target_":
        return is_registered(value)
    if path in ("optimizer._partial_", "scheduler._partial_"):
        return value is True
    if path == "optimizer._target_":  # a class of torch.optim, looked up there, never imported by name
        name = value[len("torch.optim."):] if isinstance(value, str) and value.startswith("torch.optim.") else ""
        found = getattr(torch.optim, name, None) if name.isidentifier() else None
        return isinstance(found, type) and issubclass(found, torch.optim.Optimizer)
    if path == "scheduler._target_":
        return value in SCHEDULERS
    return False


def _hydra_keys(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every Hydra key in a container tree, at any depth."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        path = f"{prefix}{key}" if isinstance(key, str) else f"{prefix.rstrip('.')}[{key}]"
        if key in HYDRA_KEYS:
            yield path, value
        yield from _hydra_keys(value, f"{path}.")


def under(path: str, keys: Iterable[str]) -> bool:
    """Whether config ``path`` is one of ``keys`` or lies below one (``dataset.root`` under ``dataset``)."""
    return any(path == key or path.startswith(f"{key}.") or path.startswith(f"{key}[") for key in keys)


def _refuse(source: Any, where: str, path: str, value: Any) -> UntrustedConfig:
    return UntrustedConfig(
        f"{source}: {where} sets {path}={value!r}; a checkpoint may not name code to run. Models are built from "
        f"segtrain's registry ({', '.join(registered_models())}; more with segtrain.models.register_model in your own "
        f"code), and {', '.join(HYDRA_KEYS)} are refused anywhere else. If you trust this file and the model is "
        "yours, register its class, or give the value on the command line")


def check_file_config(tree: dict, overrides: list[str], source: Any, replaced: Iterable[str] = ()) -> None:
    """Raise ``UntrustedConfig`` naming ``source`` and the key when the config ``tree`` (a plain container, resolved)
    or the command line ``overrides`` read from a file hold a Hydra key outside the places a segtrain run's
    config has them, or one of those with a value that is not registered. Keys under ``replaced`` are not
    checked: the user's overrides replace them."""
    replaced = list(replaced)
    for path, value in _hydra_keys(tree):
        if not under(path, replaced) and not _allowed(path, value):
            raise _refuse(source, "its stored config", path, value)
    for line, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = parsed.key_or_group
        if under(key, replaced):
            continue
        value = parsed.value()
        named = [(key, value)] if key.rsplit(".", 1)[-1] in HYDRA_KEYS else []
        named += list(_hydra_keys(value, f"{key}.")) if isinstance(value, (dict, list)) else []
        for path, inner in named:
            if not _allowed(path, inner):
                raise _refuse(source, f"its stored command line ({line!r})", path, inner)
