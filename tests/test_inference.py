"""Sliding-window and whole-image prediction, test-time augmentation, against hand cases and MONAI."""

import numpy as np
import pytest
import torch
from torch import nn

from segtrain.inference import (InferenceOptions, gaussian_importance, infer_batch, labels_of, predict_probs,
                                sliding_window, window_starts)
from segtrain.models import UNet


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return UNet(num_classes=3, encoder="resnet18", decoder_channels=[32, 16, 16, 8, 8]).eval()


def _per_pixel() -> nn.Module:
    """A 1x1 convolution: each pixel's logits depend on that pixel alone (and it is flip-equivariant)."""
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 1).eval()


def test_window_grid_covers_every_pixel_and_ends_at_the_edge():
    assert window_starts(100, 48, 0.5) == [0, 24, 48, 52]
    assert window_starts(48, 48, 0.5) == [0] and window_starts(30, 48, 0.5) == [0]
    assert window_starts(100, 48, 0.0) == [0, 48, 52]
    for size, tile, overlap in ((1000, 256, 0.5), (517, 128, 0.25), (333, 64, 0.9)):
        starts = window_starts(size, tile, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all() and starts[-1] == size - tile and starts == sorted(set(starts))


def test_gaussian_importance_peaks_at_the_centre_with_sigma_an_eighth():
    weights = gaussian_importance(33, 65)
    assert weights.shape == (33, 65) and weights.max() == weights[16, 32] == 1.0
    x = torch.arange(65, dtype=torch.float32) - 32
    torch.testing.assert_close(weights[16], torch.exp(-(x**2) / (2 * (65 / 8) ** 2)).clamp_min(1e-3))
    assert weights.min() == pytest.approx(1e-3)  # the floor: corners still count


def test_slide_with_the_tile_of_the_image_is_whole_image_inference_exactly():
    model, image = _unet(), _image(64, 80)
    whole = predict_probs(model, image, InferenceOptions(mode="whole"))
    slide = predict_probs(model, image, InferenceOptions(mode="slide", tile=(64, 80)))
    larger = predict_probs(model, image, InferenceOptions(mode="slide", tile=(512, 512)))
    assert torch.equal(whole, slide) and torch.equal(whole, larger)
    with torch.no_grad():
        assert torch.equal(whole, model(image[None]).softmax(1)[0])


def test_constant_blend_of_a_per_pixel_model_is_whole_image_inference():
    model, image = _per_pixel(), _image(70, 90)
    whole = predict_probs(model, image)
    for tile, overlap in (((32, 32), 0.5), ((20, 48), 0.25), ((64, 30), 0.75)):
        slide = predict_probs(model, image, InferenceOptions(mode="slide", tile=tile, overlap=overlap,
                                                             blend="constant", batch_size=3))
        torch.testing.assert_close(slide, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overlap,tile,batch", [(0.5, (48, 64), 4), (0.25, (40, 40), 3), (0.75, (64, 48), 16)])
def test_gaussian_blend_equals_monai_sliding_window_inference(overlap, tile, batch):
    from monai.inferers import sliding_window_inference

    model, image = _unet(), _image(100, 130, seed=1)
    ours = predict_probs(model, image, InferenceOptions(mode="slide", tile=tile, overlap=overlap, batch_size=batch))
    with torch.no_grad():
        monai = sliding_window_inference(image[None], tile, batch, lambda x: model(x).softmax(1), overlap=overlap,
                                         mode="gaussian", sigma_scale=0.125)[0]
    torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sum(0), torch.ones(100, 130), rtol=1e-5, atol=1e-5)


def test_flip_tta_of_a_flip_equivariant_model_changes_nothing():
    model, image = _per_pixel(), _image(50, 60)
    plain = predict_probs(model, image)
    for mode in ("whole", "slide"):
        flipped = predict_probs(model, image, InferenceOptions(mode=mode, tile=(32, 32), flips=("h", "v")))
        unflipped = predict_probs(model, image, InferenceOptions(mode=mode, tile=(32, 32)))
        torch.testing.assert_close(flipped, unflipped, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(flipped, plain, rtol=1e-6, atol=1e-7)
    # A model that is not flip-equivariant does change: the flips are really applied.
    unet = _unet()
    assert not torch.allclose(predict_probs(unet, image, InferenceOptions(flips=("h",))), predict_probs(unet, image))


def test_scales_average_probabilities_at_the_original_size():
    model, image = _per_pixel(), _image(40, 48)
    probs = predict_probs(model, image, InferenceOptions(scales=(0.5, 1.0, 1.5)))
    assert probs.shape == (4, 40, 48)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 48), rtol=1e-5, atol=1e-5)
    # A per-pixel model on a smooth image: the rescaled passes agree with the plain one closely.
    smooth = torch.nn.functional.interpolate(_image(5, 6)[None], size=(40, 48), mode="bilinear")[0]
    torch.testing.assert_close(predict_probs(model, smooth, InferenceOptions(scales=(0.5, 1.0))),
                               predict_probs(model, smooth), rtol=0.05, atol=0.02)


class _Huge(nn.Module):
    """fp16 logits of magnitude 1e4, as an overconfident model under fp16 autocast gives."""

    def forward(self, x):
        logits = torch.stack([x[:, 0] * 0, x[:, 0] * 0 + 1, x[:, 0] * 0 - 1], dim=1) * 1e4
        return logits.to(torch.float16)


def test_fp16_logits_of_1e4_give_finite_probabilities():
    image = _image(40, 50)
    for options in (InferenceOptions(), InferenceOptions(mode="slide", tile=(16, 16)),
                    InferenceOptions(mode="slide", tile=(16, 16), blend="constant", flips=("h",))):
        probs = predict_probs(_Huge(), image, options)
        assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
        assert torch.all(probs[1] == 1.0) and torch.all(labels_of(probs) == 1)


def test_infer_batch_returns_logits_whose_softmax_is_the_blend():
    model, images = _unet(), torch.stack([_image(48, 56, s) for s in range(2)])
    with torch.no_grad():
        assert torch.equal(infer_batch(model, images, InferenceOptions()), model(images))  # plain: the model's
    options = InferenceOptions(mode="slide", tile=(32, 32))
    logits = infer_batch(model, images, options)
    torch.testing.assert_close(logits.softmax(1)[1], predict_probs(model, images[1], options), rtol=1e-5, atol=1e-6)


def test_options_name_the_bad_key():
    with pytest.raises(ValueError, match=r"inference.mode='tiles'; valid: whole, slide"):
        InferenceOptions(mode="tiles")
    with pytest.raises(ValueError, match=r"inference.tta.flips='x'; valid: h, v"):
        InferenceOptions(flips=("x",))
    with pytest.raises(ValueError, match=r"inference.overlap=1.0"):
        InferenceOptions(overlap=1.0)


def test_sliding_window_accumulates_on_the_requested_device():
    out = sliding_window(lambda b: b[:, :2].softmax(1), _image(30, 30), (16, 16), out_device=torch.device("cpu"))
    assert out.shape == (2, 30, 30) and out.device.type == "cpu"


def test_a_buffer_that_does_not_fit_the_gpu_is_accumulated_on_the_cpu(monkeypatch, caplog):
    """The fallback decision, without a GPU: the device reports too little free memory."""
    import logging

    from segtrain.inference import windows

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 80 * 2**30))
    with caplog.at_level(logging.INFO, logger="segtrain.inference"):
        out = windows._accumulator((3, 100, 100), torch.device("cuda"))
    assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == (3, 100, 100)
    assert "accumulating the 3x100x100 probabilities on the CPU" in caplog.text


def test_multilabel_windows_blend_sigmoid_probabilities_as_monai():
    """A multi-label model's windows blend each channel's sigmoid, never a softmax over channels."""
    from monai.inferers import sliding_window_inference

    model, image = _unet(), _image(100, 130, seed=2)
    options = InferenceOptions(mode="slide", tile=(48, 64), overlap=0.5, batch_size=4, multilabel=True)
    ours = predict_probs(model, image, options)
    with torch.no_grad():
        monai = sliding_window_inference(image[None], (48, 64), 4, lambda x: model(x).sigmoid(), overlap=0.5,
                                         mode="gaussian", sigma_scale=0.125)[0]
    torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-5)
    # scored as logits whose sigmoid gives the blend back
    logits = infer_batch(model, image[None], options)[0]
    torch.testing.assert_close(logits.sigmoid(), ours, rtol=1e-5, atol=1e-6)
