"""DeepLabv3+ (Chen et al. 2018): atrous encoder, ASPP, light decoder on stride-4 features."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import check_choice
from segtrain.models.blocks import SegmentationModel, conv_bn_relu, separable_conv_bn_relu
from segtrain.models.encoders import build_encoder

_ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
_ASPP_CHANNELS = 256
_LOW_LEVEL_CHANNELS = 48


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, three dilated 3x3 convs, image pooling.

    The image-pooling branch (global average -> 1x1 conv -> ReLU, broadcast back) has no
    BatchNorm: after global pooling it would see a single value per channel and sample, so
    a batch of 1 would fail in train mode (the paper's branch has BN; this is the one
    deviation). The five branches are concatenated and projected to ``out_channels``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: tuple[int, ...], separable: bool
    ) -> None:
        super().__init__()
        atrous = separable_conv_bn_relu if separable else conv_bn_relu
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, kernel_size=1)]
            + [atrous(in_channels, out_channels, 3, dilation=rate) for rate in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(
            conv_bn_relu((len(rates) + 2) * out_channels, out_channels, kernel_size=1),
            nn.Dropout(0.1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        pooled = self.pool(x)  # (N, C, 1, 1)
        outputs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outputs, dim=1))  # cat: (N, 5 * C, H, W)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabv3+ returning logits (no activation) of shape (N, num_classes, H, W).

    Any input size works: the input is padded at the bottom/right up to a multiple of
    ``output_stride`` (reflect padding, or replicate when the image is smaller than the
    padding), and the logits -- bilinearly upsampled x4 from the decoder's stride-4 output
    to the padded size -- are cropped back to (H, W).

    Args:
        num_classes: output channels, one per class (binary data: 2, background and foreground).
        in_channels: input channels; with pretrained weights the first conv's kernel for every
            channel is ``mean(RGB kernels) * 3 / in_channels`` (see ``build_encoder``).
        encoder: a name from ``segtrain.models.ENCODERS``: every one supports output stride 16 and 8, its
            deepest stages dilated (``segtrain.models.dilation``); or ``"timm:<name>"``, dilated by timm.
        encoder_weights: ``None``, ``"imagenet"`` or a state-dict path (see ``build_encoder``).
        output_stride: 16 (ASPP rates 6, 12, 18) or 8 (rates 12, 24, 36). With resnet50 at
            512x512, 8 costs 2.6x the FLOPs and ~2.8x the CPU training time of 16
            (``scripts/bench_models.py``).
        separable: depthwise-separable 3x3 convs in ASPP and the decoder.
        freeze_bn: keep BatchNorm layers in eval mode with frozen affine parameters during
            training (see ``SegmentationModel``).

    Layout: encoder -> ASPP (256 channels) -> upsample x4 to the stride-4 features, which
    are projected to 48 channels -> concatenate -> two 3x3 conv-BN-ReLU (256) -> 1x1
    classifier. Batch 1 works in eval mode and, thanks to the BN-free image-pooling branch,
    in train mode too unless the deepest feature map is 1x1. SyncBatchNorm conversion for
    multi-GPU training is left to the caller (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        encoder_weights: str | os.PathLike | None = None,
        output_stride: int = 16,
        separable: bool = False,
        freeze_bn: bool = False,
    ) -> None:
        check_choice("output_stride", output_stride, tuple(_ASPP_RATES))
        backbone = build_encoder(encoder, in_channels, encoder_weights, output_stride)
        super().__init__(pad_multiple=backbone.output_stride, freeze_bn=freeze_bn)
        self.encoder = backbone
        self.low_level_index = backbone.strides.index(4)

        conv = separable_conv_bn_relu if separable else conv_bn_relu
        rates = _ASPP_RATES[output_stride]
        self.aspp = ASPP(backbone.channels[-1], _ASPP_CHANNELS, rates, separable)
        self.low_level_project = conv_bn_relu(
            backbone.channels[self.low_level_index], _LOW_LEVEL_CHANNELS, kernel_size=1
        )
        self.decoder = nn.Sequential(
            conv(_ASPP_CHANNELS + _LOW_LEVEL_CHANNELS, _ASPP_CHANNELS, 3),
            conv(_ASPP_CHANNELS, _ASPP_CHANNELS, 3),
        )
        self.classifier = nn.Conv2d(_ASPP_CHANNELS, num_classes, kernel_size=1)
        self.apply_freeze_bn()

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        low = self.low_level_project(features[self.low_level_index])
        high = self.aspp(features[-1])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.decoder(torch.cat([high, low], dim=1))  # cat: (N, 256 + 48, H/4, W/4)
        logits = self.classifier(y)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
