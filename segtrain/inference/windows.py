"""Whole-image and sliding-window prediction with test-time augmentation: probabilities out.

    options = InferenceOptions(mode="slide", tile=(512, 512), overlap=0.5, flips=("h",))
    probs = predict_probs(model, image, options)   # image (C, H, W) normalised; probs (K, H, W) float32
    labels = labels_of(probs)                      # (H, W) int64

Sliding windows follow the usual grid: starts every ``int(tile * (1 - overlap))`` pixels, the
last window moved back to end at the image edge, so no pixel is dropped and none is padded (an
image smaller than the tile is one window of its own size: the models pad to their stride
themselves). Each window's probabilities (softmax, always in
float32, whatever precision the model ran in) are weighted by a Gaussian importance map
(sigma = tile / 8, peak 1, floored at 1e-3, as nnU-Net and MONAI weight theirs) or by 1
(``blend="constant"``), summed in one float32 (K, H, W) buffer and divided by the summed weights
in strips, so the only full-size allocation is that buffer. A single window is returned as the
model gave it. Test-time flips average each window with its flipped copies; scales run the whole
procedure on a resized image and average the probabilities resized back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segtrain.data.raster import grid_starts
from segtrain.errors import check_choice
from segtrain.metrics import class_argmax

log = logging.getLogger(__name__)

MODES = ("whole", "slide")
BLENDS = ("gaussian", "constant")
FLIPS = ("h", "v")
ProbsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InferenceOptions:
    mode: str = "whole"
    tile: tuple[int, int] = (512, 512)  # (height, width) of a window
    overlap: float = 0.5
    blend: str = "gaussian"
    batch_size: int = 4  # windows per forward pass
    flips: tuple[str, ...] = ()  # "h" (left-right), "v" (up-down): each averaged with the unflipped pass
    scales: tuple[float, ...] = (1.0,)
    amp_dtype: torch.dtype | None = None  # autocast dtype of the forward passes
    multilabel: bool = False  # one sigmoid per channel: windows blend sigmoid probabilities, not a softmax

    def __post_init__(self) -> None:
        check_choice("inference.mode", self.mode, MODES)
        check_choice("inference.blend", self.blend, BLENDS)
        for flip in self.flips:
            check_choice("inference.tta.flips", flip, FLIPS)
        if not 0 <= self.overlap < 1:
            raise ValueError(f"inference.overlap={self.overlap}; expected a share in [0, 1)")
        if len(self.tile) != 2 or min(self.tile) < 1:
            raise ValueError(f"inference.tile={self.tile}; expected a size > 0 or [height, width]")
        if self.batch_size < 1 or not self.scales or min(self.scales) <= 0:
            raise ValueError(f"inference.batch_size={self.batch_size} must be >= 1 and inference.tta.scales="
                             f"{list(self.scales)} a non-empty list of factors > 0")

    @property
    def plain(self) -> bool:
        """One forward pass of the whole image: the model's own logits are the prediction."""
        return self.mode == "whole" and not self.flips and tuple(self.scales) == (1.0,)


def check_tile(options: InferenceOptions, model: torch.nn.Module) -> None:
    """Sliding windows no smaller than the model's stride (``pad_multiple``): a 1-pixel tile would run the network
    once per pixel (a 64x64 image never finishes), and the model pads any smaller window up to its stride anyway."""
    stride = int(getattr(model, "pad_multiple", 1))
    if options.mode == "slide" and min(options.tile) < stride:
        raise ValueError(f"inference.tile={list(options.tile)}: a window is smaller than the model's stride "
                         f"({stride}); expected at least {stride} pixels a side, typically the training crop or 512")


def window_starts(size: int, tile: int, overlap: float) -> list[int]:
    """First pixel of each window along one axis; the last window ends at ``size`` (``grid_starts``)."""
    return grid_starts(size, tile, max(int(tile * (1 - overlap)), 1))


def gaussian_importance(height: int, width: int, sigma_scale: float = 0.125,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """(height, width) float32: a Gaussian of sigma = sigma_scale * size per axis, peak 1 at the
    centre, floored at 1e-3 so that a corner covered by one window still counts."""
    axes = []
    for n in (height, width):
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        axes.append(torch.exp(x**2 / (-2 * (sigma_scale * n) ** 2)))
    weights = axes[0][:, None] * axes[1][None, :]
    return weights.clamp_(min=max(weights.min().item(), 1e-3))


def _flip(batch: torch.Tensor, flip: str) -> torch.Tensor:
    return batch.flip(-1 if flip == "h" else -2)


def _flip_averaged(probs_fn: ProbsFn, batch: torch.Tensor, flips: Sequence[str]) -> torch.Tensor:
    probs = probs_fn(batch)
    for flip in flips:  # a flip is its own inverse
        probs = probs + _flip(probs_fn(_flip(batch, flip)), flip)
    return probs / (1 + len(flips)) if flips else probs


def blend_weights(height: int, width: int, blend: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(height, width) float32 weight of each pixel of a window: ``gaussian_importance`` or 1 (``constant``)."""
    if blend == "gaussian":
        return gaussian_importance(height, width, device=device)
    return torch.ones(height, width, device=device)


def weighted_windows(probs_fn: ProbsFn, batch: torch.Tensor, flips: Sequence[str], weight: torch.Tensor
                     ) -> torch.Tensor:
    """(B, K, h, w) flip-averaged probabilities of a batch of windows (B, C, h, w), times ``weight`` in place: what
    a sliding window adds into its sums, whole image or band of rows alike."""
    return _flip_averaged(probs_fn, batch, flips).mul_(weight)


def _accumulator(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Zeros for the (K, H, W) sums on ``device``, or on the CPU when they do not fit there."""
    if device.type == "cuda":
        nbytes = 4 * torch.Size(shape).numel()
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < free // 2:  # leave room for the windows' activations
            try:
                return torch.zeros(shape, dtype=torch.float32, device=device)
            except torch.cuda.OutOfMemoryError:
                pass
        log.info("accumulating the %s probabilities on the CPU: %.0f MiB does not fit beside the model on %s",
                 "x".join(map(str, shape)), nbytes / 2**20, device)
        return torch.zeros(shape, dtype=torch.float32)
    return torch.zeros(shape, dtype=torch.float32, device=device)


def weight_sums(r0: int, r1: int, width: int, ys: list[int], xs: list[int], weight: torch.Tensor) -> torch.Tensor:
    """(r1 - r0, width) float32: the summed weights of the windows at ``ys`` x ``xs`` over rows [r0, r1), added in
    window order, so that a band of rows (``segtrain.inference.streaming``) divides by the very same numbers."""
    th, tw = weight.shape
    norm = torch.zeros(r1 - r0, width, dtype=torch.float32, device=weight.device)
    for y in ys:
        a, b = max(y, r0), min(y + th, r1)
        if a < b:
            for x in xs:
                norm[a - r0 : b - r0, x : x + tw] += weight[a - y : b - y]
    return norm


def _divide_by_weights(out: torch.Tensor, ys: list[int], xs: list[int], weight: torch.Tensor) -> None:
    """out /= the summed window weights, one strip of rows at a time (no full-size weight map)."""
    th = weight.shape[0]
    height, width = out.shape[-2:]
    weight = weight.to(out.device)
    for r0 in range(0, height, th):
        r1 = min(r0 + th, height)
        out[:, r0:r1] /= weight_sums(r0, r1, width, ys, xs, weight)


def sliding_window(probs_fn: ProbsFn, image: torch.Tensor, tile: Sequence[int], overlap: float = 0.5,
                   blend: str = "gaussian", batch_size: int = 4, flips: Sequence[str] = (),
                   out_device: torch.device | None = None) -> torch.Tensor:
    """(K, H, W) float32 blended probabilities of ``image`` (C, H, W), windows of ``tile`` (h, w).

    ``probs_fn`` maps a batch of windows (B, C, h, w) to float32 probabilities (B, K, h, w).
    """
    height, width = image.shape[-2:]
    th, tw = min(int(tile[0]), height), min(int(tile[1]), width)
    ys, xs = window_starts(height, th, overlap), window_starts(width, tw, overlap)
    windows = [(y, x) for y in ys for x in xs]
    if len(windows) == 1:  # the whole image: the model's probabilities as they are
        return _flip_averaged(probs_fn, image[None], flips)[0].to(out_device or image.device)
    weight = blend_weights(th, tw, blend, image.device)
    out = None
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        batch = torch.stack([image[:, y : y + th, x : x + tw] for y, x in chunk])  # (B, C, th, tw)
        probs = weighted_windows(probs_fn, batch, flips, weight)  # (B, K, th, tw)
        if out is None:
            out = _accumulator((probs.shape[1], height, width), out_device or image.device)
        probs = probs.to(out.device)
        for (y, x), p in zip(chunk, probs):
            out[:, y : y + th, x : x + tw] += p
    _divide_by_weights(out, ys, xs, weight)
    return out


def probabilities_fn(model: torch.nn.Module, amp_dtype: torch.dtype | None = None,
                     logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     multilabel: bool = False) -> ProbsFn:
    """Batch -> float32 softmax of ``model``'s logits (``multilabel``: a sigmoid per channel), computed in float32
    whatever precision the forward pass ran in (fp16 logits of 1e4 give finite probabilities)."""

    @torch.no_grad()
    def probs(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch)
        logits = logits.float()
        if logit_transform is not None:
            logits = logit_transform(logits)
        return logits.sigmoid() if multilabel else logits.softmax(dim=1)

    return probs


def _resized(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def predict_probs(model: torch.nn.Module, image: torch.Tensor, options: InferenceOptions = InferenceOptions(),
                  out_device: torch.device | None = None,
                  logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(K, H, W) float32 probabilities of one normalised image (C, H, W), as ``options`` say."""
    probs_fn = probabilities_fn(model, options.amp_dtype, logit_transform, options.multilabel)
    height, width = image.shape[-2:]
    total = None
    for scale in options.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = image if size == (height, width) else _resized(image, size)
        tile = options.tile if options.mode == "slide" else size
        probs = sliding_window(probs_fn, x, tile, options.overlap, options.blend, options.batch_size,
                               options.flips, out_device)
        if size != (height, width):
            probs = _resized(probs, (height, width))
        total = probs if total is None else total.add_(probs)
    return total / len(options.scales) if len(options.scales) > 1 else total


def labels_of(probs: torch.Tensor) -> torch.Tensor:
    """(H, W) int64 classes of (K, H, W) probabilities (``metrics.class_argmax``: the one arg-max rule)."""
    return class_argmax(probs[None])[0]


def as_logits(probs: torch.Tensor, eps: float = 1e-12, multilabel: bool = False) -> torch.Tensor:
    """Logits whose softmax (``multilabel``: sigmoid) gives ``probs`` back, for losses and metrics."""
    if multilabel:  # clamped where float32 still tells 1 - p from 1: the logit stays finite
        return probs.logit(eps=max(eps, 1e-6))
    return probs.clamp_min(eps).log()


def infer_batch(model: torch.nn.Module, images: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """Logits of a batch (N, C, H, W) as ``options`` predict them: the model's own for plain
    whole-image inference, else the log of each image's blended probabilities."""
    if options.plain:
        if options.amp_dtype is None:  # leaves a caller's autocast as it is
            return model(images)
        with torch.autocast(images.device.type, dtype=options.amp_dtype):
            return model(images)
    return as_logits(torch.stack([predict_probs(model, image, options) for image in images]),
                     multilabel=options.multilabel)


def scored_logits(model: torch.nn.Module, images: torch.Tensor, size: Sequence[int],
                  options: InferenceOptions | None) -> torch.Tensor:
    """``infer_batch`` (the model's own logits when ``options`` is None) at ``size`` (H, W), the masks' resolution,
    as evaluation scores them: ``dataset.val_resize=<int>`` runs the model on resized images."""
    logits = model(images) if options is None else infer_batch(model, images, options)
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return logits
