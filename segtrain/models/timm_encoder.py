"""Any hierarchical timm backbone as a feature-pyramid encoder: ``model.encoder=timm:<name>`` (the ``timm`` extra).

    encoder = build_timm_encoder("timm:convnext_tiny", in_channels=3, weights="imagenet", output_stride=16)
    features = encoder(x)   # shallow to deep; encoder.channels and encoder.strides describe them

timm builds the backbone itself (``timm.create_model(name, features_only=True, in_chans=..., output_stride=...)``);
the levels, their channels and strides come from its ``feature_info``, checked by one forward pass of a zero
image at build time, which also shows that the model runs at an input size other than its own (ViT and
Swin-style models that fix it, or give every level one stride, are refused here, naming the reason). Families
whose features come channels last (MambaOut, ...) are turned channels first. Output stride 16 and 8 (DeepLabV3+)
are timm's own dilation; a model that cannot is refused with the strides it can.

Weights: ``imagenet`` is timm's default pretrained tag, downloaded by timm (Hugging Face hub cache); a local
``.safetensors`` / ``.pth`` file is loaded by segtrain and checked key by key (timm's own loading of a file
accepts a state dict of another model silently). ``in_channels != 3``: the first conv of RGB weights is adapted
as timm does it (``adapt_input_conv``). ``pretrained_normalisation`` gives the mean/std the weights expect.
"""

from __future__ import annotations

import difflib
import os
from functools import cache

import torch
from torch import nn

from segtrain.models.encoders import Encoder, load_checked, read_state_file

PREFIX = "timm:"
EXTRA = "pip install -e '.[timm]'"
_PROBE = (64, 96)  # height, width of the build-time probe: multiples of 32, not square


def is_timm(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"model.encoder=timm:...: timm is not installed; {EXTRA} (the timm extra)") from err
    return timm


@cache
def _names() -> tuple[str, ...]:
    return tuple(_timm().list_models())


def check_timm_name(encoder: str) -> str:
    """The timm model name of ``timm:<name>``; an unknown one is refused with the closest names timm has."""
    timm, name = _timm(), encoder[len(PREFIX):]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, _names(), n=5, cutoff=0.6)
        raise ValueError(f"model.encoder={encoder!r}: timm {timm.__version__} has no model {name!r}"
                         f"{'; close: ' + ', '.join(close) if close else ''} (timm.list_models('*{name[:6]}*') "
                         "lists names; timm.list_models(pretrained=True) those with weights)")
    return name


def pretrained_normalisation(encoder: str) -> tuple[list[float], list[float]] | None:
    """(mean, std) that the default pretrained weights of ``timm:<name>`` expect, or None when timm has none."""
    cfg = _timm().models.get_pretrained_cfg(check_timm_name(encoder))
    if cfg is None or cfg.mean is None:
        return None
    return [float(m) for m in cfg.mean], [float(s) for s in cfg.std]


class TimmEncoder(Encoder):
    """A timm features_only model as segtrain's Encoder: one body returning every level (channels first, also for
    the families whose features come channels last)."""

    def __init__(self, name: str, body: nn.Module, channels: tuple[int, ...], strides: tuple[int, ...]) -> None:
        super().__init__(name, [], channels, strides)
        self.body = body
        self.channels_last_out = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(x)
        if self.channels_last_out:
            return [f.permute(0, 3, 1, 2) for f in features]  # (N, H, W, C) -> (N, C, H, W)
        return list(features)


def _create(name: str, in_channels: int, output_stride: int, pretrained: bool) -> nn.Module:
    """timm's features_only model; a stride it cannot make is refused with the strides it can, weights it cannot
    fetch (offline, no cache) are named as such."""
    kwargs = {"output_stride": output_stride} if output_stride != 32 else {}
    try:
        return _timm().create_model(name, features_only=True, pretrained=pretrained, in_chans=in_channels, **kwargs)
    except Exception as err:  # timm raises several types for a stride it cannot make, the hub several more
        if pretrained and _builds(name, in_channels, output_stride):
            raise RuntimeError(f"model.encoder=timm:{name}: timm could not load its pretrained weights "
                               f"({type(err).__name__}: {err}); without internet, put them in the Hugging Face "
                               "cache (HF_HOME) or give encoder_weights=<local file>") from err
        if not kwargs:
            raise
        can = [s for s in (32, 16, 8) if s != output_stride and _builds(name, in_channels, s)]
        raise ValueError(f"model.encoder=timm:{name} cannot be built with output_stride={output_stride} (timm: "
                         f"{type(err).__name__}: {err}); it can with output_stride {', '.join(map(str, can))}"
                         ) from None


def _builds(name: str, in_channels: int, output_stride: int) -> bool:
    try:
        _create(name, in_channels, output_stride, pretrained=False)
    except Exception:  # timm raises several types for a stride it cannot make
        return False
    return True


def _check_levels(encoder: TimmEncoder, in_channels: int, output_stride: int) -> None:
    """One forward pass of a zero image: the model runs at a size other than its own, gives the channels and the
    strides its feature_info says, and the strides make a pyramid from 4 to ``output_stride``."""
    name, (height, width) = encoder.name, _PROBE
    strides = encoder.strides
    if 4 not in strides or strides[-1] != output_stride or list(strides) != sorted(strides):
        raise ValueError(f"model.encoder={name!r} gives its levels at strides {strides}: UNet and DeepLabV3+ need a "
                         f"pyramid from stride 4 to the output stride ({output_stride}): a hierarchical backbone")
    training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            features = encoder(torch.zeros(1, in_channels, height, width))
    except Exception as err:  # timm asserts on an input size a model does not take
        raise ValueError(f"model.encoder={name!r} does not run at an input size other than its own ({height}x{width} "
                         f"here: {type(err).__name__}: {err}); segmentation needs any size, so this family is not "
                         "supported (a convolutional or hierarchical one is)") from None
    finally:
        encoder.train(training)
    measured = [(f.shape[1], f.shape[-2], f.shape[-1]) for f in features]
    expected = [(c, -(-height // s), -(-width // s)) for c, s in zip(encoder.channels, strides)]
    if measured != expected:
        raise ValueError(f"model.encoder={name!r}: its features (channels, height, width) at {height}x{width} are "
                         f"{measured}, not the {expected} its feature_info gives")


def _load_file(body: nn.Module, name: str, in_channels: int, weights: str | os.PathLike) -> None:
    """A local state dict of the whole timm model into the features model, every key checked; the keys of the
    layers features_only leaves out (the head) are the only ones allowed to go unused."""
    timm = _timm()
    state, source = read_state_file(weights)
    with torch.device("meta"):  # the key names only: no weights allocated or initialised
        full = set(timm.create_model(name, pretrained=False, in_chans=in_channels).state_dict())
    kept = set(body.state_dict())
    head = full - kept
    first = getattr(timm.models.get_pretrained_cfg(name), "first_conv", None)
    key = f"{first}.weight" if first else None
    if key in state and key in body.state_dict() and state[key].shape[1] != in_channels:
        state[key] = timm.models.adapt_input_conv(in_channels, state[key])
    load_checked(body, state, source, owner=f"timm's {name}", ignored=lambda k: k in head)


def build_timm_encoder(encoder: str, in_channels: int = 3, weights: str | os.PathLike | None = None,
                       output_stride: int = 32) -> TimmEncoder:
    """The encoder ``timm:<name>``; ``weights``: None (random init), ``imagenet`` (timm's default pretrained tag)
    or a local file."""
    name = check_timm_name(encoder)
    body = _create(name, in_channels, output_stride, pretrained=weights == "imagenet")
    if weights not in (None, "imagenet"):
        _load_file(body, name, in_channels, weights)
    channels = tuple(int(c) for c in body.feature_info.channels())
    strides = tuple(int(r) for r in body.feature_info.reduction())
    result = TimmEncoder(encoder, body, channels, strides)
    _check_levels(result, in_channels, output_stride)
    return result
