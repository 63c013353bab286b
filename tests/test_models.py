"""Model tests: one parametrized set of checks over architecture x encoder, plus weights.

Tiny widths and 64x64 inputs keep every case under a second on a 2-core CPU.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import torch

from segtrain.models import ENCODERS, DeepLabV3Plus, UNet, build_encoder, encoders_supporting
from segtrain.models.blocks import batchnorm_layers, pad_to_multiple

import torchvision  # noqa: E402  # isort: skip  (after segtrain: its import shim must run first)

SMALL_DECODER = (32, 16, 16, 8, 8)

# (id, model class, kwargs): the architecture x encoder grid every check runs on.
CASES = [
    ("unet-classic", UNet, dict(encoder=None, base_width=8)),
    ("unet-resnet18", UNet, dict(encoder="resnet18", decoder_channels=SMALL_DECODER)),
    ("unet-mobilenet", UNet, dict(encoder="mobilenet_v3_large", decoder_channels=SMALL_DECODER)),
    ("unet-effnet_b0", UNet, dict(encoder="efficientnet_b0", decoder_channels=SMALL_DECODER)),
    ("unet-convnext", UNet, dict(encoder="convnext_tiny", decoder_channels=SMALL_DECODER)),
    ("dlv3p-resnet18-os16", DeepLabV3Plus, dict(encoder="resnet18", output_stride=16)),
    ("dlv3p-resnet18-os8", DeepLabV3Plus, dict(encoder="resnet18", output_stride=8)),
    ("dlv3p-resnet18-sep", DeepLabV3Plus, dict(encoder="resnet18", separable=True)),
    ("dlv3p-mobilenet-os16", DeepLabV3Plus, dict(encoder="mobilenet_v3_large", output_stride=16)),
]
CASE_IDS = [case[0] for case in CASES]


def build(case, **overrides):
    _, cls, kwargs = case
    torch.manual_seed(0)
    return cls(**{"num_classes": 3, **kwargs, **overrides})


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param


@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_output_shape_train_mode(case, size):
    model = build(case).train()
    x = torch.randn(2, 3, *size)
    assert model(x).shape == (2, 3, *size)


def test_batch_one_eval(case):
    model = build(case).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)


def test_gradients_reach_first_conv(case):
    model = build(case).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    torch.nn.functional.cross_entropy(model(x), target).backward()
    grad = model.encoder.first_conv.weight.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_channels_last_matches_contiguous(case):
    model = build(case).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_one_input_channel_one_class(case):
    model = build(case, in_channels=1, num_classes=1).train()
    x = torch.randn(2, 1, 40, 56)
    assert model(x).shape == (2, 1, 40, 56)


def test_input_smaller_than_padding():
    # 5x7 cannot be reflect-padded up to 16x16; the replicate fallback must take over.
    model = UNet(num_classes=2, encoder=None, base_width=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 5, 7)).shape == (1, 2, 5, 7)


@pytest.mark.parametrize("multiple", [8, 16, 32])
def test_padding_equals_reflect_or_replicate_pad_at_every_size(multiple):
    """pad_to_multiple gathers rows and columns (no branch on the size, for export): exactly F.pad's
    reflect padding, or replicate when either side is not larger than its padding."""
    for height in (1, 2, 5, 15, 16, 17, 31, 32, 33, 47, 64, 100):
        for width in (1, 3, 16, 20, 33, 64, 97):
            x = torch.randn(2, 3, height, width)
            pad_h, pad_w = -height % multiple, -width % multiple
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            expected = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode=mode)
            assert torch.equal(pad_to_multiple(x, multiple), expected), (height, width, mode)


def test_deeplab_batch_one_train_mode():
    # The image-pooling branch has no BatchNorm, so a single image trains too.
    model = build(CASES[5]).train()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_freeze_bn_keeps_running_stats():
    model = build(CASES[1], freeze_bn=True).train()
    layers = batchnorm_layers(model)
    before = [bn.running_mean.clone() for bn in layers]
    model(torch.randn(2, 3, 64, 64))
    assert all(not bn.training for bn in layers)
    assert all(not p.requires_grad for bn in layers for p in bn.parameters())
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, layers))
    assert model.encoder.first_conv.weight.requires_grad


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ValueError, match=r"encoder='resnet19' is unknown \(or timm:<name>, any timm backbone: the timm "
                                         r"extra\); valid: .*resnet18.*convnext_tiny"):
        UNet(num_classes=3, encoder="resnet19")


def test_output_stride_unsupported_lists_supporting_encoders():
    with pytest.raises(ValueError, match=r"'mobilenet_v3_large' does not support output_stride=4.*none"):
        build_encoder("mobilenet_v3_large", output_stride=4)
    assert encoders_supporting(8) == encoders_supporting(16) == list(ENCODERS)


# One encoder of each family (each dilation code path) in every run; the rest under `-m grid` (~3 minutes here).
FAMILY_REPRESENTATIVES = ("resnet18", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")


@pytest.mark.slow
@pytest.mark.parametrize("name", [name if name in FAMILY_REPRESENTATIVES else pytest.param(name, marks=pytest.mark.grid)
                                  for name in ENCODERS])
def test_every_encoder_under_both_architectures_and_both_strides_gives_full_resolution_logits(name):
    """UNet (stride 32) and DeepLabV3+ at output stride 16 and 8: forward and backward at a size that is not a
    multiple of 32, logits at the input's resolution, a gradient reaching the first convolution."""
    x = torch.randn(1, 3, 37, 45)
    for model in (UNet(num_classes=3, encoder=name, decoder_channels=SMALL_DECODER),
                  DeepLabV3Plus(num_classes=3, encoder=name, output_stride=16),
                  DeepLabV3Plus(num_classes=3, encoder=name, output_stride=8)):
        model.eval()  # batch 1: BatchNorm in eval mode
        logits = model(x)
        assert logits.shape == (1, 3, 37, 45), (name, type(model).__name__)
        logits.square().mean().backward()
        first = model.encoder.first_conv.weight.grad
        assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0, name


@pytest.mark.parametrize("output_stride", [16, 8])
def test_convnext_dilation_is_the_a_trous_identity(output_stride):
    """No global pooling in ConvNeXt: the dilated encoder's deepest features at every (32 / output_stride)-th
    position are the stride-32 encoder's, with the same weights."""
    torch.manual_seed(0)
    strided, dilated = build_encoder("convnext_tiny").eval(), build_encoder("convnext_tiny", output_stride=output_stride)
    # Same modules in the same order; the dilated 2x2 downsampling convs sit inside a RightPad (".conv").
    dilated.load_state_dict(dict(zip(dilated.state_dict(), strided.state_dict().values())))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = strided(x)[-1], dilated.eval()(x)[-1]
    step = 32 // output_stride
    assert actual.shape[-1] == 64 // output_stride
    torch.testing.assert_close(actual[..., ::step, ::step], expected, atol=1e-4, rtol=1e-4)


def test_decoder_channels_length_checked():
    with pytest.raises(ValueError, match="needs 4"):
        UNet(num_classes=3, encoder=None, base_width=8, decoder_channels=SMALL_DECODER)


@pytest.mark.slow
def test_every_encoder_matches_its_declared_pyramid():
    x = torch.randn(1, 3, 64, 64)
    for name in ENCODERS:  # output strides 16 and 8 of the others: the grid test (-m grid)
        for output_stride in (32, 16, 8) if name in FAMILY_REPRESENTATIVES else (32,):
            encoder = build_encoder(name, output_stride=output_stride).eval()
            with torch.no_grad():
                features = encoder(x)
            assert tuple(f.shape[1] for f in features) == encoder.channels, name
            assert tuple(64 // f.shape[-1] for f in features) == encoder.strides, name
            assert max(encoder.strides) == output_stride, name


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet_dilation_matches_torchvision(output_stride):
    # torchvision's own replace_stride_with_dilation is the reference for Bottleneck ResNets.
    flags = {16: [False, False, True], 8: [False, True, True]}[output_stride]
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=flags)
    encoder = build_encoder("resnet50", output_stride=output_stride)
    encoder.load_state_dict(_stage_state(reference), strict=True)
    x = torch.randn(1, 3, 64, 64)
    reference.eval(), encoder.eval()
    with torch.no_grad():
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
        actual = encoder(x)[-1]
    assert actual.shape[-1] == 64 // output_stride
    torch.testing.assert_close(actual, expected)


def _stage_state(resnet):
    """A torchvision ResNet's weights, keyed like segtrain's Encoder stages."""
    renames = {"conv1.": "stages.0.0.", "bn1.": "stages.0.1.", "layer1.": "stages.1.1.",
               "layer2.": "stages.2.", "layer3.": "stages.3.", "layer4.": "stages.4."}
    out = {}
    for key, value in resnet.state_dict().items():
        for old, new in renames.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


def test_local_state_dict_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    model = UNet(num_classes=3, encoder="resnet18", encoder_weights=str(path))
    assert torch.equal(model.encoder.first_conv.weight, source.conv1.weight)
    assert torch.equal(model.encoder.stages[4][1].conv2.weight, source.layer4[1].conv2.weight)


def test_local_state_dict_adapts_first_conv_to_one_channel(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    encoder = build_encoder("resnet18", in_channels=1, weights=path)
    expected = source.conv1.weight.mean(dim=1, keepdim=True) * 3.0
    torch.testing.assert_close(encoder.first_conv.weight, expected)


def test_local_state_dict_errors_name_path_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_encoder("resnet18", weights=str(tmp_path / "nope.pt"))
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"broken\.pt.*layer1\.0\.conv1\.weight.*extra\.weight"):
        build_encoder("resnet18", weights=str(path))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub dir in tmp_path, and a download function that always fails."""
    previous = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # TORCH_HOME alone is enough unless torch.hub.set_dir() pinned a directory earlier.
    pinned = torch.hub.get_dir() != str(tmp_path / "hub")
    if pinned:
        torch.hub.set_dir(str(tmp_path / "hub"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    yield Path(torch.hub.get_dir())
    if pinned:
        torch.hub.set_dir(previous)


def _imagenet_file_name(weights_enum) -> str:
    return os.path.basename(urllib.parse.urlparse(weights_enum.url).path)


def test_imagenet_weights_from_hub_cache(offline_hub):
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)
    checkpoints = offline_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    file_name = _imagenet_file_name(torchvision.models.ResNet18_Weights.DEFAULT)
    torch.save(source.state_dict(), checkpoints / file_name)
    model = UNet(num_classes=3, encoder="resnet18", encoder_weights="imagenet")
    assert torch.equal(model.encoder.first_conv.weight, source.conv1.weight)


def test_imagenet_weights_offline_error_says_where_to_put_file(offline_hub):
    file_name = _imagenet_file_name(torchvision.models.ResNet18_Weights.DEFAULT)
    with pytest.raises(RuntimeError) as info:
        UNet(num_classes=3, encoder="resnet18", encoder_weights="imagenet")
    message = str(info.value)
    assert file_name in message
    assert str(offline_hub / "checkpoints") in message
    assert "encoder_weights=null" in message
