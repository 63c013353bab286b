"""How far the predicted probabilities can be trusted, and one temperature that makes them more so.

``ReliabilityHistogram`` streams a split's pixels into reliability bins on the device (no host read per
batch): top-label ECE (the most probable class's probability against how often it is right) and
per-class, one-vs-rest ECE (p(c) against how often the pixel is c). The bins are torchmetrics': 15
equal-width bins from ``torch.bucketize(p, linspace(0, 1, 16), right=True) - 1`` plus one for p == 1.0,
so the numbers equal ``MulticlassCalibrationError(n_bins=15, norm="l1")`` and ``BinaryCalibrationError``.

``PixelSample`` keeps a fixed-seed sample of a split's (logits, label) pairs, on which ``fit_temperature``
minimises the NLL of ``logits / T`` (Guo et al. 2017) and ``segtrain.analysis.decision`` tunes a per-class bias.
``LogitCalibration`` is what a calibrated checkpoint applies: ``logits / T + bias``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.distributed import all_reduce_sum
from segtrain.metrics import class_argmax


class ReliabilityHistogram:
    """Counts and probability sums per reliability bin over a whole split, for top-label and per-class ECE."""

    def __init__(self, num_classes: int, bins: int = 15, ignore_index: int = 255,
                 device: torch.device | str | None = None, multilabel: bool = False) -> None:
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"calibration.bins={bins!r}: expected a whole number >= 1")
        self.num_classes = num_classes
        # Multi-label: per channel its sigmoid p against the channel's truth; no top label, so the one number
        # (``ece``, ``top_label``) pools every channel's (pixel, p) entries.
        self.multilabel = multilabel
        self.bins = bins
        self.ignore_index = ignore_index
        n = bins + 1  # the last bin holds p == 1.0 exactly (bucketize's right edge), as torchmetrics counts it
        self.boundaries = torch.linspace(0, 1, bins + 1, device=device)
        # The bin edges with +inf after the last: _bin_of looks up both edges of its first guess.
        self.edges = torch.cat([self.boundaries, torch.tensor([math.inf], device=device)])
        # Top label: (pixels, of them correct) and the summed confidence; per class: (pixels, positives), sum p(c).
        self.top_counts = torch.zeros(2, n, dtype=torch.int64, device=device)
        self.top_conf = torch.zeros(n, dtype=torch.float64, device=device)
        self.class_counts = torch.zeros(2, self.num_classes * n, dtype=torch.int64, device=device)
        self.class_prob = torch.zeros(self.num_classes * n, dtype=torch.float64, device=device)

    def _to(self, device: torch.device) -> None:
        for name in ("boundaries", "edges", "top_counts", "top_conf", "class_counts", "class_prob"):
            setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, preds: torch.Tensor | None = None) -> None:
        """``logits`` (N, K, H, W) of any float dtype (probabilities taken in float32), ``target`` (N, H, W);
        ``preds``, their arg-max labels (``metrics.class_argmax``) if the caller has them already."""
        if self.boundaries.device != logits.device:
            self._to(logits.device)
        probs = logits.float().sigmoid() if self.multilabel else logits.float().softmax(dim=1)  # (N, K, H, W)
        k, n = probs.shape[1], self.bins + 1
        if k != self.num_classes:
            raise ValueError(f"logits with {k} classes for a histogram of {self.num_classes}")
        valid = target != self.ignore_index
        classes = torch.arange(k, device=probs.device, dtype=torch.int32).view(1, k, 1, 1)
        if self.multilabel:  # target (N, K, H, W): the entry is of its channel's class where it is 1
            positive, valid_entries = target == 1, valid
        else:
            labels = torch.where(valid, target, 0).int()[:, None]  # (N, 1, H, W)
            positive, valid_entries = labels == classes, valid[:, None]
        bins = self._bin_of(probs)  # (N, K, H, W)
        # One code per pixel and class: (class * n + bin) * 2 + (the pixel is of the class); ignored pixels get
        # one extra code that is dropped (no boolean indexing: it would sync on CUDA).
        code = (bins + classes * n).mul_(2).add_(positive).masked_fill_(~valid_entries, 2 * k * n).flatten()
        counts = torch.bincount(code, minlength=2 * k * n + 1)[: 2 * k * n].view(k * n, 2)
        self.class_counts[0] += counts.sum(1)
        self.class_counts[1] += counts[:, 1]
        sums = torch.bincount(code, weights=probs.flatten().double(), minlength=2 * k * n + 1)[: 2 * k * n]
        self.class_prob += sums.view(k * n, 2).sum(1)
        if self.multilabel:
            return
        # Top label: the bins are monotone in p, so the top probability's bin is the largest bin (amax: the
        # indices of max cost ~30x more on a CPU). Right = the arg-max, the first of tied maxima, is the true class.
        conf = probs.amax(dim=1)  # (N, H, W)
        if preds is None:
            preds = class_argmax(probs)
        right = preds.view_as(target) == labels[:, 0]
        top = bins.amax(dim=1).mul_(2).add_(right).masked_fill_(~valid, 2 * n).flatten()
        counts = torch.bincount(top, minlength=2 * n + 1)[: 2 * n].view(n, 2)
        self.top_counts[0] += counts.sum(1)
        self.top_counts[1] += counts[:, 1]
        self.top_conf += torch.bincount(top, weights=conf.flatten().double(), minlength=2 * n + 1)[: 2 * n].view(n, 2).sum(1)

    def _bin_of(self, p: torch.Tensor) -> torch.Tensor:
        """``torch.bucketize(p, self.boundaries, right=True) - 1``, exactly, for less on a CPU: the guess
        floor(p * bins) is off by one for a few values within an ulp of an edge, which the comparison with the
        guess's own edges moves to where edge[i] <= p < edge[i + 1] holds."""
        flat = p.flatten()
        guess = (flat * self.bins).int().clamp_(0, self.bins)  # int32: integer work at several times int64's speed
        low = self.edges.index_select(0, guess)
        high = self.edges.index_select(0, guess + 1)
        guess.sub_((flat < low).int()).add_((flat >= high).int())
        return guess.view_as(p)

    def all_reduce(self) -> None:
        """Sum every rank's counts (a no-op without DDP); call once, before reading."""
        for tensor in (self.top_counts, self.top_conf, self.class_counts, self.class_prob):
            all_reduce_sum(tensor)

    def top_label(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per bin (CPU float64): pixels, accuracy, mean confidence (NaN in empty bins). Multi-label: every channel's
        entries pooled, p against the share of them present."""
        if self.multilabel:
            counts, positives = self.class_counts.double().cpu().view(2, self.num_classes, -1).sum(1)
            return counts, positives / counts, self.class_prob.cpu().view(self.num_classes, -1).sum(0) / counts
        counts, correct = self.top_counts.double().cpu()
        return counts, correct / counts, self.top_conf.cpu() / counts

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per class and bin, (K, bins + 1) CPU float64: pixels, share of them of the class, mean p(class)."""
        counts, positives = self.class_counts.double().cpu().view(2, self.num_classes, -1)
        return counts, positives / counts, self.class_prob.cpu().view(self.num_classes, -1) / counts

    def ece(self) -> float:
        """Top-label expected calibration error: sum over bins of share x |accuracy - confidence|."""
        return float(expected_calibration_error(*self.top_label()))

    def class_ece(self) -> torch.Tensor:
        """(K,) one-vs-rest ECE per class; NaN without labelled pixels."""
        return expected_calibration_error(*self.per_class())


def expected_calibration_error(counts: torch.Tensor, observed: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Sum over the last (bin) dimension of share x |observed - predicted|; empty bins count 0."""
    total = counts.sum(-1)
    gap = torch.where(counts > 0, (observed - predicted).abs(), torch.zeros_like(counts))
    return torch.where(total > 0, (gap * counts).sum(-1) / total.clamp_min(1), torch.full_like(total, math.nan))


class PixelSample:
    """A fixed-seed sample of a split's labelled pixels, ``per_image`` at most from each image.

    Each image's pixels get random keys from a seeded generator; the ``per_image`` smallest keys among
    its labelled pixels are kept. Nothing is read back to the host until ``tensors``.
    """

    def __init__(self, per_image: int, ignore_index: int = 255, seed: int = 0) -> None:
        if per_image < 1:
            raise ValueError(f"{per_image} pixels per image: expected at least 1 (calibration.max_pixels)")
        self.per_image, self.ignore_index, self.seed = per_image, ignore_index, seed
        self.generator: torch.Generator | None = None
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if self.generator is None:
            self.generator = torch.Generator(logits.device).manual_seed(self.seed)
        logits = logits.float()
        n, k = logits.shape[:2]
        multilabel = target.dim() == logits.dim()  # (N, C, H, W): a pixel is labelled where any channel is
        labelled = target != self.ignore_index
        valid = (labelled.any(1) if multilabel else labelled).flatten(1)  # (N, H*W)
        keys = torch.rand(valid.shape, generator=self.generator, device=logits.device)
        keys = torch.where(valid, keys, 2.0)  # unlabelled pixels sort last
        take = keys.topk(min(self.per_image, keys.shape[1]), dim=1, largest=False).indices  # (N, S)
        flat = logits.flatten(2)  # (N, K, H*W)
        picked = take[:, None].expand(n, k, -1)
        self.logits.append(flat.gather(2, picked).transpose(1, 2).reshape(-1, k))  # (N*S, K)
        if multilabel:  # (N*S, C): 1 present, 0 absent, -1 ignored in that channel
            labels = torch.where(labelled, target.long(), -1).flatten(2).gather(2, picked)
            self.labels.append(labels.transpose(1, 2).reshape(-1, k))
            return
        self.labels.append(torch.where(valid.gather(1, take), target.flatten(1).gather(1, take).long(),
                                       -1).flatten())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, K) float32 logits and (P,) int64 labels of the sampled labelled pixels (multi-label: (P, C) labels,
        -1 where a channel is ignored)."""
        if not self.logits:
            raise ValueError("no pixels sampled: the split has no images")
        logits, labels = torch.cat(self.logits), torch.cat(self.labels)
        keep = labels >= 0 if labels.dim() == 1 else (labels >= 0).any(1)
        return logits[keep], labels[keep]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the mean NLL of ``softmax(logits / T)`` (LBFGS on log T, from T = 1)."""
    logits = logits.float()
    log_t = torch.zeros(1, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits * torch.exp(-log_t), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(torch.exp(log_t.detach()))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
    with torch.no_grad():
        return float(F.cross_entropy(logits.float() / temperature, labels))


class LogitCalibration(nn.Module):
    """``logits / temperature + bias`` per class: a temperature of 1 and a zero bias return the same numbers."""

    def __init__(self, temperature: float, bias: list[float] | torch.Tensor) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
        self.temperature = float(temperature)
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature + self.bias.to(logits.dtype)


class CalibratedModel(nn.Module):
    """A segmentation model whose logits go through a ``LogitCalibration``: what predict, evaluate and export
    build from a calibrated checkpoint."""

    def __init__(self, model: nn.Module, calibration: LogitCalibration) -> None:
        super().__init__()
        self.model, self.calibration = model, calibration
        if hasattr(model, "pad_multiple"):  # read by export (deploy.min_size)
            self.pad_multiple = model.pad_multiple

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.calibration(self.model(image))


def fitted_on(split) -> dict[str, str]:
    """Where a calibration was fitted, as the checkpoint records it and ``evaluate`` compares it."""
    root = str(Path(split.root).resolve())
    return {"root": root, "split": split.split, "name": f"{split.root}/{split.split}"}
