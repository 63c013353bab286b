"""Building blocks shared by the segmentation models.

Conv blocks (conv -> BatchNorm -> ReLU, plain or depthwise-separable), input padding to a
multiple of the network's stride, and ``SegmentationModel``: the base class that pads the
input, crops the logits back and implements ``freeze_bn``.
"""

from __future__ import annotations

import torch
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


def _reflected_index(size: int, padded: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions 0 .. padded - 1, the source of each under reflection: ``size - 2`` for ``size``,
    ...); the reflection runs past the first pixel, to negative values, when ``padded >= 2 * size``."""
    position = torch.arange(padded, device=device)
    return position, (size - 1) - (position - (size - 1)).abs()


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of ``x`` (N, C, H, W) so that H and W divide by ``multiple``.

    Reflect padding gives the network plausible image content at the border; an image smaller
    than the padding it needs cannot be reflected, so it falls back to replicate padding.
    Padding only bottom/right keeps pixel (0, 0) in place, so cropping back is ``[:H, :W]``.

    The values are exactly ``F.pad``'s reflect or replicate padding, written as index gathers
    with no Python branch on the size: the same code is right at every size once traced, so a
    model exported with dynamic height and width (``segtrain.export``) pads like the eager one.
    An already divisible input is gathered too (a copy of the input, cheap beside the network).
    """
    height, width = x.shape[-2:]
    # The padded size written as multiple * ceil(size / multiple), which a tracer simplifies
    # through the strided layers far better than size + (-size % multiple).
    row, row_reflected = _reflected_index(height, (height + multiple - 1) // multiple * multiple, x.device)
    col, col_reflected = _reflected_index(width, (width + multiple - 1) // multiple * multiple, x.device)
    # Reflection needs pad < size on both axes; decided in a tensor, not in a traced Python bool.
    reflect = (row_reflected[-1] >= 0) & (col_reflected[-1] >= 0)
    rows = torch.where(reflect, row_reflected, row.clamp_max(height - 1))
    cols = torch.where(reflect, col_reflected, col.clamp_max(width - 1))
    return x.index_select(-2, rows).index_select(-1, cols)


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
        # Cropped whether or not there was padding, by gathers rather than a slice: a traced slice
        # needs a proof that the padded size is >= (H, W), which the symbolic shapes cannot give.
        # The result is a contiguous copy, so callers may .view() the logits.
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        return logits.index_select(-2, rows).index_select(-1, cols)

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
