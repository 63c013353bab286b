"""What every stage runs on: ``Runtime`` (device, precision as ``resolve_amp`` picks it, memory layout, chosen once)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from segtrain.errors import check_choice

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
NATIVE_BF16_ENV = "SEGTRAIN_NATIVE_BF16"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs that compute in bf16 natively. (``torch.ops.mkldnn.
    _is_mkldnn_bf16_supported()`` is also true on plain AVX-512, where bf16 is emulated: half the
    speed of fp32 there, docs/BENCHMARKS.md.) ``SEGTRAIN_NATIVE_BF16=1`` or ``0`` overrides the detection: for
    a CPU it misjudges, and for tests of either path on any CPU (``pytest --native-bf16=1``)."""
    forced = os.environ.get(NATIVE_BF16_ENV, "")
    if forced:
        check_choice(NATIVE_BF16_ENV, forced, ("0", "1"))
        return forced == "1"
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the hardware has it (CUDA with bf16, CPUs with native bf16 units),
    else fp16 on CUDA and full precision on CPU, where emulated bf16 is slower than fp32."""
    check_choice("trainer.amp", amp, AMP_CHOICES)
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if cpu_has_native_bf16() else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return images, masks.to(self.device, non_blocking=True)
