"""Make ``import torchvision`` work beside a torch build it was not compiled against.

A torchvision wheel built for CUDA, installed next to the CPU build of torch, cannot load
its ``_C`` extension. torchvision handles that for every op except two: its
``_meta_registrations`` module registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, and registering a kernel for an op with no schema
raises ``RuntimeError: operator torchvision::nms does not exist`` during the import.

``ensure_torchvision_importable()`` runs before segtrain's first torchvision import. If the
extension loads, nothing is changed. If it does not, the two schemas are declared (with the
signatures torchvision's C++ code gives them), so the import succeeds; models and transforms
work, and ``torchvision.ops.nms`` still fails with torchvision's own "Couldn't load custom
C++ ops" error, which segtrain never needs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# The Library object must outlive the module import: dropping it removes the definitions.
_fallback_library: torch.library.Library | None = None


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to repair, the import error will be the real one
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        # The same call torchvision makes at import; loading twice is a no-op.
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    global _fallback_library
    if "torchvision" in sys.modules or _fallback_library is not None:
        return
    if _extension_loads():
        return
    _fallback_library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _fallback_library.define(schema)


def torchvision_ops_available() -> bool:
    """True when torchvision's compiled ops (nms, roi_align, ...) can run."""
    ensure_torchvision_importable()
    import torchvision.extension

    return torchvision.extension._has_ops()
