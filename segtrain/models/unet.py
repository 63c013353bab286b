"""U-Net (Ronneberger et al. 2015), classic or on a torchvision encoder."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.blocks import SegmentationModel, conv_bn_relu
from segtrain.models.encoders import Encoder, build_encoder

_DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def classic_unet_encoder(in_channels: int, base_width: int, depth: int = 4) -> Encoder:
    """The paper's contracting path: two 3x3 convs per level, 2x2 max-pool between levels.

    Widths double per level: base_width * (1, 2, 4, 8, 16) at strides (1, 2, 4, 8, 16).
    Convs are padded and followed by BatchNorm, so no cropping of the skips is needed.
    """
    widths = tuple(base_width * 2**level for level in range(depth + 1))
    stages: list[nn.Module] = [
        nn.Sequential(conv_bn_relu(in_channels, widths[0]), conv_bn_relu(widths[0], widths[0]))
    ]
    for level in range(1, depth + 1):
        stages.append(
            nn.Sequential(
                nn.MaxPool2d(2),
                conv_bn_relu(widths[level - 1], widths[level]),
                conv_bn_relu(widths[level], widths[level]),
            )
        )
    strides = tuple(2**level for level in range(depth + 1))
    return Encoder("unet", stages, widths, strides)


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip if there is one, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = torch.cat([x, skip], dim=1)  # (N, C_in + C_skip, H, W)
        return self.conv2(self.conv1(x))


class UNet(SegmentationModel):
    """U-Net returning logits (no activation) of shape (N, num_classes, H, W).

    Any input size works: the input is padded at the bottom/right up to a multiple of the
    encoder's total stride (32 with a torchvision encoder, 16 for the classic U-Net) --
    reflect padding, or replicate when the image is smaller than the padding -- and the
    logits are cropped back to (H, W); the output is never interpolated.

    Args:
        num_classes: output channels, one per class (binary data: 2, background and foreground).
        in_channels: input channels. With pretrained weights and ``in_channels != 3`` the
            first conv's kernel for every input channel is ``mean(RGB kernels) * 3 /
            in_channels``; without, it is randomly initialised.
        encoder: a name from ``segtrain.models.ENCODERS``, ``"timm:<name>"`` for a timm backbone
            (``segtrain.models.timm_encoder``), or ``None`` for the classic
            encoder-free U-Net (Ronneberger et al. 2015): 4 downsamplings, widths
            ``base_width * (1, 2, 4, 8, 16)``, padded convs with BatchNorm.
        encoder_weights: ``None``, ``"imagenet"`` or a state-dict path (see
            ``build_encoder``). Must be ``None`` when ``encoder`` is ``None``.
        decoder_channels: output channels of each decoder block, deepest first; one entry per
            x2 upsampling (5 with a torchvision encoder, 4 for the classic U-Net).
            ``None``: (256, 128, 64, 32, 16) with an encoder; the mirrored encoder widths
            ``base_width * (8, 4, 2, 1)`` for the classic U-Net.
        base_width: width of the classic U-Net's first level (the paper uses 64). Ignored
            when ``encoder`` is set.
        freeze_bn: keep BatchNorm layers in eval mode and their affine parameters frozen
            during training (see ``SegmentationModel``).

    Decoder blocks upsample with nearest-neighbour x2 then two 3x3 conv-BN-ReLU (instead of
    the paper's 2x2 transposed conv); with ConvNeXt (no stride-2 features) the stride-2
    block has no skip connection. A 1x1 conv gives the logits. For multi-GPU training,
    BatchNorm can later be converted with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    (not done here). In train mode BatchNorm needs more than one value per channel, so a
    batch of 1 fails when the deepest feature map is 1x1 (inputs of 32x32 or smaller).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = "resnet34",
        encoder_weights: str | os.PathLike | None = None,
        decoder_channels: Sequence[int] | None = None,
        base_width: int = 64,
        freeze_bn: bool = False,
    ) -> None:
        if encoder is None:
            if encoder_weights is not None:
                raise ValueError(
                    f"encoder_weights={encoder_weights!r} needs an encoder; the classic U-Net "
                    "(encoder=None) only trains from scratch (encoder_weights=null)"
                )
            backbone = classic_unet_encoder(in_channels, base_width)
        else:
            backbone = build_encoder(encoder, in_channels, encoder_weights)
        super().__init__(pad_multiple=backbone.output_stride, freeze_bn=freeze_bn)
        self.encoder = backbone

        num_upsamplings = int(math.log2(backbone.output_stride))
        if decoder_channels is None:
            if encoder is None:
                decoder_channels = tuple(reversed(backbone.channels[:-1]))
            else:
                decoder_channels = _DEFAULT_DECODER_CHANNELS
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != num_upsamplings:
            raise ValueError(
                f"decoder_channels={list(decoder_channels)} has {len(decoder_channels)} "
                f"entries; encoder={encoder!r} needs {num_upsamplings} (one per x2 "
                "upsampling), or decoder_channels=null for the default"
            )

        # The block ending at stride s takes the encoder feature at stride s as its skip.
        skip_strides = backbone.strides[:-1]
        self.skip_index: list[int | None] = []
        blocks = []
        in_ch = backbone.channels[-1]
        for level, out_ch in enumerate(decoder_channels, start=1):
            stride = backbone.output_stride // 2**level
            index = skip_strides.index(stride) if stride in skip_strides else None
            self.skip_index.append(index)
            skip_ch = 0 if index is None else backbone.channels[index]
            blocks.append(DecoderBlock(in_ch, skip_ch, out_ch))
            in_ch = out_ch
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_ch, num_classes, kernel_size=1)
        self.apply_freeze_bn()

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = features[-1]
        for block, index in zip(self.decoder, self.skip_index):
            y = block(y, None if index is None else features[index])
        return self.head(y)
