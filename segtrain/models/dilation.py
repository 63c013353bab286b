"""Output stride 16 or 8 for the encoders: the deepest stages trade their stride-2 convolutions for dilation.

At output stride 16 the last feature level is dilated, at 8 the last two. Within a dilated level the
convolutions up to its strided one keep the previous rate and the later ones double it (the rule of
torchvision's ``replace_stride_with_dilation``); padding grows with the rate, so feature sizes stay those
of the stride-2 positions (the a trous identity: ``dilated[..., ::2, ::2] == strided`` where no global
pooling intervenes, tested on ConvNeXt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dilate_resnet(model: nn.Module, output_stride: int) -> None:
    """Swap the strides of the deepest ResNet layers for dilation, after construction.

    torchvision's ``replace_stride_with_dilation`` raises NotImplementedError for
    BasicBlock (resnet18/34), so every ResNet is dilated here with torchvision's Bottleneck
    rule: the first block of a dilated layer keeps the previous dilation, the rest double it.
    """
    layers = {16: ("layer4",), 8: ("layer3", "layer4")}[output_stride]
    dilation = 1
    for layer_name in layers:
        previous, dilation = dilation, dilation * 2
        for index, block in enumerate(getattr(model, layer_name)):
            rate = previous if index == 0 else dilation
            for conv in block.modules():
                if not isinstance(conv, nn.Conv2d):
                    continue
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation = (rate, rate)
                    conv.padding = (rate, rate)


def dilate_stages(stages: list[nn.Module]) -> None:
    """Dilate ``stages`` (the deepest feature levels of a MobileNetV3, EfficientNet or ConvNeXt), shallow to
    deep. An even kernel (ConvNeXt's 2x2 downsampling) is padded on the right and bottom (``RightPad``)."""
    dilation = 1
    for stage in stages:
        previous, dilation = dilation, dilation * 2
        rate = previous
        for parent in list(stage.modules()):
            for child_name, conv in list(parent.named_children()):
                if not isinstance(conv, nn.Conv2d):
                    continue
                strided = conv.stride != (1, 1)
                conv.stride = (1, 1)
                if conv.kernel_size != (1, 1):
                    k = conv.kernel_size[0]
                    conv.dilation = (rate, rate)
                    conv.padding = ((k - 1) // 2 * rate,) * 2 if k % 2 else (0, 0)
                    if k % 2 == 0:
                        setattr(parent, child_name, RightPad(conv, (k - 1) * rate))
                if strided:
                    rate = dilation


class RightPad(nn.Module):
    """``conv`` after ``pad`` zeros on the right and bottom: an even kernel at stride 1 keeps the size, and
    position i sees what the stride-2 original saw at i / 2."""

    def __init__(self, conv: nn.Conv2d, pad: int) -> None:
        super().__init__()
        self.conv, self.pad = conv, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, self.pad, 0, self.pad)))
