"""Segmentation models: U-Net and DeepLabv3+ on torchvision encoders.

    >>> from segtrain.models import UNet, DeepLabV3Plus, ENCODERS
    >>> model = UNet(num_classes=3, encoder="resnet18", decoder_channels=(128, 64, 32, 16, 16))
    >>> model = DeepLabV3Plus(num_classes=3, encoder="resnet50", output_stride=16)

Both return logits (no activation) at the input's resolution for any input size. ``register_model(MyNet)``
lets checkpoints of a model class of your own be read (``segtrain.models.registry``).
"""

from segtrain.models.deeplabv3plus import DeepLabV3Plus
from segtrain.models.encoders import ENCODERS, Encoder, build_encoder, encoders_supporting
from segtrain.models.registry import register_model
from segtrain.models.unet import UNet

__all__ = [
    "ENCODERS",
    "DeepLabV3Plus",
    "Encoder",
    "UNet",
    "build_encoder",
    "encoders_supporting",
    "register_model",
]
