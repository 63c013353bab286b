"""The model as a deployment runs it: raw or normalised input in, logits, probabilities or a mask out.

    net = DeployModel(model, head="argmax", lut=normalisation_lut(mean, std))
    program = trace(net, channels=3, size=(512, 512))     # torch.export, dynamic batch/height/width
    onnx_program = to_onnx(program, opset=18, metadata=...)

``DeployModel`` wraps a trained segmentation model in eval mode with its SyncBatchNorm layers
turned back into BatchNorm. With a normalisation table (``input=uint8``) it takes (N, C, H, W)
uint8 values 0-255 and looks each one up in a (C, 256) float32 table made by the checkpoint's own
evaluation transform, so the graph normalises exactly as ``segtrain.predict`` does. Heads:
``logits`` as the model gives them; ``probabilities``, a softmax over classes; ``argmax``, the
(N, H, W) class mask. A multi-label model (``multilabel=True``) gives a sigmoid per channel as its
probabilities and, as its mask, the (N, C, H, W) decisions probability > 0.5 (``head=mask`` names
the same head for either kind). The models pad and crop without branching on the input size
(``models.blocks.pad_to_multiple``), so one trace is right at every height and width.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import segtrain
from segtrain.data.transforms import eval_transform
from segtrain.errors import check_choice

log = logging.getLogger(__name__)

HEADS = ("logits", "probabilities", "argmax", "mask")
# The graph's output by head ("argmax" would clash with the node of that name in the ONNX graph).
OUTPUT_NAMES = {"logits": "logits", "probabilities": "probabilities", "argmax": "mask", "mask": "mask"}
INPUTS = ("float", "uint8")
MASK_DTYPES = {"uint8": torch.uint8, "int64": torch.int64}
EXTRA_HINT = "pip install -e '.[export]' (or pip install onnx onnxscript onnxruntime)"


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every SyncBatchNorm replaced by a BatchNorm2d holding the same statistics and
    affine parameters (SyncBatchNorm only means something inside a process group)."""
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        setattr(module, name, plain_batchnorm(child))
    return module


def normalisation_lut(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, 256) float32: entry [c, v] is what the evaluation transform makes of value v in channel c."""
    channels = len(mean)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], channels, axis=2)  # (1, 256, C)
    normalised = eval_transform(mean=mean, std=std)(image=ramp)["image"]
    return torch.from_numpy(np.ascontiguousarray(normalised[0].T, dtype=np.float32))


class DeployModel(nn.Module):
    """``model`` with its input normalisation (``lut``, for uint8 input) and output head in one graph."""

    def __init__(self, model: nn.Module, head: str = "logits", lut: torch.Tensor | None = None,
                 mask_dtype: str = "uint8", multilabel: bool = False) -> None:
        super().__init__()
        check_choice("head", head, HEADS)
        check_choice("mask_dtype", mask_dtype, tuple(MASK_DTYPES))
        self.model = plain_batchnorm(model).eval()
        self.head, self.mask_dtype = "argmax" if head == "mask" else head, MASK_DTYPES[mask_dtype]
        self.multilabel = multilabel
        self.uint8 = lut is not None
        if lut is not None:
            # Flat table and per-channel offsets: one gather looks every value up in its channel's row.
            self.register_buffer("lut", lut.reshape(-1).clone())
            self.register_buffer("offsets", (torch.arange(lut.shape[0]) * lut.shape[1]).view(1, -1, 1, 1))
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.lut[image.long() + self.offsets] if self.uint8 else image
        logits = self.model(x)
        if self.head == "logits":
            return logits
        if self.multilabel:  # segtrain.metrics.channel_decisions' rule: probability > 0.5
            probs = logits.float().sigmoid()
            return probs if self.head == "probabilities" else (probs > 0.5).to(self.mask_dtype)
        if self.head == "probabilities":
            return logits.softmax(dim=1)
        return logits.argmax(dim=1).to(self.mask_dtype)

    def example(self, channels: int, size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A reproducible input of this graph's dtype: 0-255 values, or normal ones for float input."""
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, channels, *size)
        if self.uint8:
            return torch.randint(0, 256, shape, generator=generator, dtype=torch.int64).to(torch.uint8)
        return torch.randn(shape, generator=generator)


def min_size(net: DeployModel) -> int:
    """The smallest height and width the trace covers: one more than the model's stride. Below it the
    deepest feature map is 1x1, a case torch.export keeps apart (its memory-layout checks differ)."""
    return int(getattr(net.model, "pad_multiple", 32)) + 1


def trace(net: DeployModel, channels: int, size: tuple[int, int]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``net`` with dynamic batch, height and width (from ``min_size``), traced at
    batch 2 x ``size`` (an example dimension of 1 would be specialised to 1)."""
    if min(size) < min_size(net):
        raise ValueError(f"size={list(size)}: the example input must be at least {min_size(net)} pixels a side")
    # Height and width as Dim.DYNAMIC: torch refines their range from the guards a graph needs (timm's ConvNeXt
    # asks that no level be 1 pixel wide, which a named Dim would reject as a violated constraint).
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim.DYNAMIC(min=min_size(net)),
            3: torch.export.Dim.DYNAMIC(min=min_size(net))}
    example = net.example(channels, size, batch=2)
    try:
        with torch.no_grad():
            return torch.export.export(net, (example,), dynamic_shapes={"image": dims}, strict=False)
    except Exception as err:  # torch raises a dozen types for a graph it cannot capture
        raise RuntimeError(f"torch.export could not capture {type(net.model).__name__} with dynamic "
                           f"height and width: {type(err).__name__}: {err}") from err


def require_onnx() -> dict[str, str]:
    """The versions of onnx, onnxscript and onnxruntime; a clear error naming the extra when one is missing."""
    versions = {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError as err:
            raise ImportError(f"format=onnx needs {name}, which is not installed: {EXTRA_HINT}") from err
    return versions


def to_onnx(program: torch.export.ExportedProgram, opset: int, output_name: str,
            metadata: dict[str, Any]):
    """The ONNX program of ``program`` (torch's dynamo exporter, graph optimised), ``metadata`` in its
    ``metadata_props``. Save with ``.save(path)``."""
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, output_names=[output_name],
                                     optimize=True, verbose=False)
    # metadata_props holds strings: lists and numbers as JSON.
    onnx_program.model.metadata_props.update(
        {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()})
    return onnx_program


def metadata(*, class_names: list[str], palette: np.ndarray, mean: Sequence[float],
             std: Sequence[float], net: DeployModel, channels: int, exporter: str, checkpoint: str) -> dict[str, Any]:
    """What a deployment needs to read the file's input and output (strings, numbers and lists)."""
    if net.uint8:
        layout = f"image: (N, {channels}, H, W) uint8, values 0-255 (RGB order), normalised inside the graph"
    else:
        layout = f"image: (N, {channels}, H, W) float32, (value / 255 - mean) / std per channel, RGB order"
    layout += f"; any H, W >= {min_size(net)}"
    mask_dtype = str(net.mask_dtype).removeprefix("torch.")
    outputs = {"logits": "(N, K, H, W) float32 logits", "probabilities": "(N, K, H, W) float32 probabilities",
               "argmax": f"(N, H, W) {mask_dtype} label indices"}
    if net.multilabel:
        outputs.update(probabilities="(N, K, H, W) float32 sigmoid probabilities, one per channel",
                       argmax=f"(N, K, H, W) {mask_dtype} per-channel masks, 1 where probability > 0.5")
    return {
        "segtrain_version": segtrain.__version__, "exporter": exporter, "checkpoint": checkpoint,
        "class_names": class_names, "label_names": class_names, "palette": palette.tolist(),
        "mean": list(mean), "std": list(std), "input_name": "image", "input_layout": layout,
        "input_dtype": "uint8" if net.uint8 else "float32", "min_size": min_size(net), "head": net.head,
        "output_name": OUTPUT_NAMES[net.head], "output_layout": outputs[net.head], "multilabel": net.multilabel,
    }
