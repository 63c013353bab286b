"""torchvision classification networks turned into multi-scale feature pyramids.

``build_encoder(name)`` builds the torchvision model with ``weights=None``, loads weights
into it if asked, adapts the first conv to ``in_channels``, and keeps the stages that give
features at strides 2, 4, 8, 16, 32; the classification head is dropped. Levels per family
(channels are listed in ``_SPECS``):

- ResNet / ResNeXt / Wide ResNet: conv1+bn+relu (stride 2), maxpool+layer1 (4),
  layer2 (8), layer3 (16), layer4 (32).
- MobileNetV3-Large and EfficientNet-B0..B4: the last block of ``features`` at each stride.
  The final 1x1 expansion conv (960 / 1280..1792 channels) exists only to feed the
  classifier and is dropped, so the stride-32 level is the last inverted-residual stage.
- ConvNeXt: the stem patchifies with stride 4, so there is no stride-2 level. Its pyramid
  has 4 levels, strides (4, 8, 16, 32), each the output of a ConvNeXt stage. The U-Net
  decoder upsamples through stride 2 without a skip connection.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model_builder, get_model_weights

from segtrain.errors import choice_message
from segtrain.models.dilation import dilate_resnet, dilate_stages


@dataclass(frozen=True)
class _Spec:
    family: str  # "resnet" | "mobilenet_v3" | "efficientnet" | "convnext"
    channels: tuple[int, ...]  # per feature level, shallow to deep
    output_strides: tuple[int, ...]  # deepest strides this encoder can be built with


_BASIC = (64, 64, 128, 256, 512)
_BOTTLENECK = (64, 256, 512, 1024, 2048)
_DILATABLE = (8, 16, 32)

_SPECS: dict[str, _Spec] = {
    "resnet18": _Spec("resnet", _BASIC, _DILATABLE),
    "resnet34": _Spec("resnet", _BASIC, _DILATABLE),
    "resnet50": _Spec("resnet", _BOTTLENECK, _DILATABLE),
    "resnet101": _Spec("resnet", _BOTTLENECK, _DILATABLE),
    "resnet152": _Spec("resnet", _BOTTLENECK, _DILATABLE),
    "resnext50_32x4d": _Spec("resnet", _BOTTLENECK, _DILATABLE),
    "resnext101_32x8d": _Spec("resnet", _BOTTLENECK, _DILATABLE),
    "wide_resnet50_2": _Spec("resnet", _BOTTLENECK, _DILATABLE),
    "mobilenet_v3_large": _Spec("mobilenet_v3", (16, 24, 40, 112, 160), _DILATABLE),
    "efficientnet_b0": _Spec("efficientnet", (16, 24, 40, 112, 320), _DILATABLE),
    "efficientnet_b1": _Spec("efficientnet", (16, 24, 40, 112, 320), _DILATABLE),
    "efficientnet_b2": _Spec("efficientnet", (16, 24, 48, 120, 352), _DILATABLE),
    "efficientnet_b3": _Spec("efficientnet", (24, 32, 48, 136, 384), _DILATABLE),
    "efficientnet_b4": _Spec("efficientnet", (24, 32, 56, 160, 448), _DILATABLE),
    "convnext_tiny": _Spec("convnext", (96, 192, 384, 768), _DILATABLE),
    "convnext_small": _Spec("convnext", (96, 192, 384, 768), _DILATABLE),
}

ENCODERS: tuple[str, ...] = tuple(_SPECS)

# Slices of `model.features` that make up each feature level.
_FEATURE_SLICES = {
    "mobilenet_v3": ((0, 2), (2, 4), (4, 7), (7, 13), (13, 16)),
    "efficientnet": ((0, 2), (2, 3), (3, 4), (4, 6), (6, 8)),
    "convnext": ((0, 2), (2, 4), (4, 6), (6, 8)),
}
_FIRST_CONV = {"resnet": "conv1"}  # the other families: features.0.0
_HEAD_PREFIXES = ("fc.", "classifier.")


def encoders_supporting(output_stride: int) -> list[str]:
    """Names of the encoders that can be built with this output stride."""
    return [name for name, spec in _SPECS.items() if output_stride in spec.output_strides]


class Encoder(nn.Module):
    """A stack of stages; ``forward`` returns every stage's output, shallow to deep.

    ``channels[i]`` and ``strides[i]`` describe the i-th returned feature map. With
    dilation, the deepest strides repeat (ResNet at output stride 8: 2, 4, 8, 8, 8).
    """

    def __init__(
        self,
        name: str,
        stages: list[nn.Module],
        channels: tuple[int, ...],
        strides: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.strides = strides

    @property
    def output_stride(self) -> int:
        return self.strides[-1]

    @property
    def first_conv(self) -> nn.Conv2d:
        return next(m for m in self.modules() if isinstance(m, nn.Conv2d))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def build_encoder(
    name: str,
    in_channels: int = 3,
    weights: str | os.PathLike | None = None,
    output_stride: int = 32,
) -> Encoder:
    """Build the feature-pyramid encoder ``name`` (one of ``ENCODERS``).

    weights: ``None`` (random init), ``"imagenet"`` (torchvision's DEFAULT ImageNet weights,
        e.g. ``ResNet50_Weights.IMAGENET1K_V2``, downloaded once into
        ``torch.hub.get_dir()/checkpoints``), or the path of a local state dict of the
        torchvision model (raw, or under a ``"state_dict"`` key; ``fc.*`` / ``classifier.*``
        keys are ignored, a ``module.`` prefix from DDP is stripped).
    in_channels: with pretrained RGB weights and ``in_channels != 3``, every input channel
        of the new first conv gets ``mean(RGB kernels) * 3 / in_channels``, so an image with
        all channels equal to v gives the same response as an RGB image of grey v. A local
        state dict whose first conv already has ``in_channels`` inputs is loaded as is.
        Without weights the new conv is Kaiming-normal (fan_out) initialised.
    output_stride: 32 (no dilation), or 16/8 where ``encoders_supporting`` lists the encoder.
        The deepest stages trade their stride for dilation (``segtrain.models.dilation``).
    """
    if isinstance(name, str) and name.startswith("timm:"):
        from segtrain.models.timm_encoder import build_timm_encoder  # here: that module builds on this one

        return build_timm_encoder(name, in_channels, weights, output_stride)
    if name not in _SPECS:
        raise ValueError(choice_message("encoder", name, ENCODERS, "is unknown (or timm:<name>, any timm "
                                                                  "backbone: the timm extra)"))
    if in_channels < 1:
        raise ValueError(f"in_channels={in_channels} must be >= 1")
    spec = _SPECS[name]
    if output_stride not in spec.output_strides:
        supporting = encoders_supporting(output_stride) or ["none (valid: 8, 16, 32)"]
        raise ValueError(f"encoder {name!r} does not support output_stride={output_stride} (it supports "
                         f"{', '.join(map(str, spec.output_strides))}); encoders that support "
                         f"output_stride={output_stride}: {', '.join(supporting)}")
    model = get_model_builder(name)(weights=None)
    if spec.family == "resnet" and output_stride < 32:
        dilate_resnet(model, output_stride)

    first_conv_name = _FIRST_CONV.get(spec.family, "features.0.0")
    state, source = _resolve_weights(name, weights)
    if state is None:
        if in_channels != 3:
            _replace_first_conv(model, first_conv_name, in_channels, init_from=None)
    else:
        loaded_in = state.get(f"{first_conv_name}.weight", torch.empty(0, 3)).shape[1]
        if in_channels != 3 and loaded_in == in_channels:
            _replace_first_conv(model, first_conv_name, in_channels, init_from=None)
        load_checked(model, state, source)
        if in_channels != loaded_in:
            rgb = model.get_submodule(first_conv_name).weight.detach()
            _replace_first_conv(model, first_conv_name, in_channels, init_from=rgb)

    stages = _split_stages(model, spec.family)
    if spec.family != "resnet" and output_stride < 32:
        dilate_stages(stages[-{16: 1, 8: 2}[output_stride]:])
    base_strides = (4, 8, 16, 32) if spec.family == "convnext" else (2, 4, 8, 16, 32)
    strides = tuple(min(s, output_stride) for s in base_strides)
    return Encoder(name, stages, spec.channels, strides)


def _split_stages(model: nn.Module, family: str) -> list[nn.Module]:
    if family == "resnet":
        return [
            nn.Sequential(model.conv1, model.bn1, model.relu),
            nn.Sequential(model.maxpool, model.layer1),
            model.layer2,
            model.layer3,
            model.layer4,
        ]
    return [model.features[start:stop] for start, stop in _FEATURE_SLICES[family]]


def _replace_first_conv(
    model: nn.Module, conv_name: str, in_channels: int, init_from: torch.Tensor | None
) -> None:
    old = model.get_submodule(conv_name)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
    )
    with torch.no_grad():
        if init_from is None:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                new.bias.zero_()
        else:
            mean = init_from.mean(dim=1, keepdim=True)  # (out, 1, kh, kw)
            new.weight.copy_((mean * 3.0 / in_channels).expand_as(new.weight))
            if new.bias is not None:
                new.bias.copy_(old.bias)
    parent_name, _, attr = conv_name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _resolve_weights(
    name: str, weights: str | os.PathLike | None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Return (state dict or None, a description of where it came from)."""
    if weights is None:
        return None, ""
    if weights == "imagenet":
        return _imagenet_state_dict(name)
    return read_state_file(weights)


def read_state_file(weights: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, its path) of a local weights file: a ``.safetensors`` file, or a torch file holding the state
    dict itself or under ``state_dict`` / ``model``; a ``module.`` prefix from DDP is stripped."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder_weights={str(weights)!r}: no such file; valid values are null (random "
            "init), 'imagenet', or the path of a state dict file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # the timm extra brings safetensors

        loaded = load_file(str(path))
    else:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    state = {k.removeprefix("module."): v for k, v in loaded.items()}
    return state, str(path)


def _imagenet_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str]:
    weights_enum = get_model_weights(name).DEFAULT
    url = weights_enum.url
    file_name = os.path.basename(urllib.parse.urlparse(url).path)
    checkpoint_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        # Reads checkpoint_dir/file_name when present; downloads it otherwise.
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as err:  # offline: URLError, socket errors, HTTP errors, hash mismatch
        raise RuntimeError(
            f"could not load ImageNet weights for encoder {name!r} ({weights_enum}): {err}. "
            f"Download {url} and place it as {file_name!r} in {checkpoint_dir}, "
            "or set encoder_weights=null to train from scratch."
        ) from err
    return state, os.path.join(checkpoint_dir, file_name)


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str, owner: str | None = None,
                 ignored: Callable[[str], bool] | None = None) -> None:
    """Load ``state`` into ``model``, ignoring head keys (``ignored``, else torchvision's fc./classifier.); fail
    naming the missing, unexpected and wrongly shaped keys."""
    ignored = ignored or (lambda key: key.startswith(_HEAD_PREFIXES))
    state = {k: v for k, v in state.items() if not ignored(k)}
    expected = {k: v for k, v in model.state_dict().items() if not ignored(k)}
    # Pre-2018 torchvision files predate BatchNorm's num_batches_tracked; BN fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape)):
        if keys:
            problems.append(f"{len(keys)} {label} keys, first: {', '.join(keys[:5])}")
    if problems:
        owner = owner or f"torchvision's {type(model).__name__}"
        raise RuntimeError(f"encoder weights {source} do not match {owner}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)
