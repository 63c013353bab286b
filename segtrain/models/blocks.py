"""Building blocks shared by the segmentation models.

Conv blocks (conv -> BatchNorm -> ReLU, plain or depthwise-separable), input padding to a
multiple of the network's stride, and ``SegmentationModel``: the base class that pads the
input, crops the logits back and implements ``freeze_bn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
) -> nn.Sequential:
    """Conv (no bias: BatchNorm's shift replaces it) -> BatchNorm -> ReLU, size-preserving."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def separable_conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
) -> nn.Sequential:
    """Depthwise conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU.

    The "atrous separable convolution" of DeepLabv3+ (Chen et al. 2018, Sec. 3.1), with BN
    and ReLU after both convs as in the paper's Xception blocks.
    """
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
        ),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of ``x`` (N, C, H, W) so that H and W divide by ``multiple``.

    Reflect padding gives the network plausible image content at the border; an image smaller
    than the padding it needs cannot be reflected, so it falls back to replicate padding.
    Padding only bottom/right keeps pixel (0, 0) in place, so cropping back is ``[:H, :W]``.
    """
    height, width = x.shape[-2:]
    pad_h = -height % multiple
    pad_w = -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers (BatchNorm1d/2d/3d and SyncBatchNorm) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


class SegmentationModel(nn.Module):
    """Base class: pads the input to a multiple of ``pad_multiple``, crops the logits back.

    Subclasses implement ``forward_padded(x)``, which sees an input whose height and width
    divide by ``pad_multiple`` and returns logits of the same height and width.

    ``freeze_bn=True`` keeps every BatchNorm layer in eval mode (running statistics are used
    and never updated) even while the model trains, and its affine parameters get
    ``requires_grad=False``. Useful for fine-tuning with tiny batches. Subclasses call
    ``self.apply_freeze_bn()`` once all their layers exist.
    """

    def __init__(self, pad_multiple: int, freeze_bn: bool = False) -> None:
        super().__init__()
        self.pad_multiple = pad_multiple
        self.freeze_bn = freeze_bn

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        logits = self.forward_padded(pad_to_multiple(x, self.pad_multiple))
        if logits.shape[-2:] == (height, width):
            return logits
        # A contiguous copy, not a strided view, so callers may .view() the logits.
        return logits[..., :height, :width].contiguous()

    def apply_freeze_bn(self) -> None:
        if not self.freeze_bn:
            return
        for bn in batchnorm_layers(self):
            for param in bn.parameters():
                param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.freeze_bn:
            for bn in batchnorm_layers(self):
                bn.eval()
        return self
