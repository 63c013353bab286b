"""The images where a class fails most: kept while an evaluation runs, drawn one gallery per class.

An evaluation scores every image (``per_image.PerImageConfusion``); ``HardCases`` keeps, per class, the ``k``
images with the lowest Dice so far and its prediction of the class on them, shrunk to a gallery panel (``PANEL``):
a top-k on the device, bounded (C x k thumbnails whatever the split's size), with no host read per batch and no
image predicted a second time. ``galleries`` draws them (``visualize.error_gallery``), each image and its truth
read again from the dataset and shrunk on the same pixel grid; ``write_report`` writes the report's files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segtrain.analysis.per_image import PerImageReport
from segtrain.data.multilabel import unpack
from segtrain.distributed import all_gather_objects
from segtrain.metrics import channel_scores, class_scores
from segtrain.visualize import denormalize, error_gallery

log = logging.getLogger(__name__)

# (height, width) of a gallery panel at most: three panels keep a gallery under 900 px wide, and 11 classes'
# galleries of 8 rows of 480x360 photographs under 5 MB as JPEG (docs/BENCHMARKS.md, scripts/bench_report.py).
PANEL = (216, 288)


def panel_size(height: int, width: int) -> tuple[int, int]:
    """The thumbnail size of a (height, width) prediction: shrunk to fit ``PANEL``, never enlarged."""
    scale = min(1.0, PANEL[0] / height, PANEL[1] / width)
    return max(1, int(height * scale)), max(1, int(width * scale))


def panel_grid(size: int, out: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The source pixel of each of ``out`` nearest-neighbour samples along ``size`` pixels (each cell's centre), in
    integers: the device and the drawing pick the same pixels."""
    return (2 * torch.arange(out, device=device) + 1) * size // (2 * out)


@dataclass
class HardCase:
    index: int  # in the dataset
    dice: float
    size: tuple[int, int]  # (height, width) of the batch the prediction was shrunk from (padded to its largest)
    predicted: np.ndarray  # bool panel_size(*size): where the class was predicted


class HardCases:
    """Per class, the ``k`` images with the lowest Dice so far among those where the class is in the truth or the
    prediction, ranked as ``per_image.worst_images`` ranks them (ties: the lower dataset index first), with the
    class's predicted pixels as ``PANEL``-sized thumbnails, kept on the device."""

    def __init__(self, num_classes: int, k: int, device: torch.device | str | None = None,
                 multilabel: bool = False) -> None:
        self.num_classes, self.k, self.multilabel = num_classes, k, multilabel
        device = torch.device(device or "cpu")
        self.scores = torch.zeros((num_classes, 0), dtype=torch.float64, device=device)  # (C, <=k), ascending
        self.index = torch.zeros((num_classes, 0), dtype=torch.int64, device=device)
        self.size = torch.zeros((num_classes, 0, 2), dtype=torch.int64, device=device)
        self.thumbs = torch.zeros((num_classes, 0, *PANEL), dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, matrices: torch.Tensor, preds: torch.Tensor, indices: torch.Tensor) -> None:
        """``matrices``: the batch's per-image (N, C, C) (multi-label (N, C, 2, 2)) matrices; ``preds``: its labels
        (N, H, W) or decisions (N, C, H, W); ``indices``: its (N,) dataset indices, on the device."""
        c, n, device = self.num_classes, preds.shape[0], preds.device
        dice = (channel_scores if self.multilabel else class_scores)(matrices)["dice"]  # (N, C)
        dice = dice.nan_to_num(math.inf)  # a class in neither the truth nor the prediction: no candidate
        height, width = preds.shape[-2:]
        th, tw = panel_size(height, width)
        small = preds.index_select(-2, panel_grid(height, th, device)).index_select(-1, panel_grid(width, tw, device))
        # One panel per image (a multi-label image: per channel), not per class: a batch costs N panels here and
        # C x k gathered below. Labels in a byte where they fit; the fill (outside the thumbnail) is no class.
        dtype = torch.bool if self.multilabel else torch.uint8 if c < 255 else torch.int32
        canvas = torch.full((n, *small.shape[1:-2], *PANEL), 0 if self.multilabel else c, dtype=dtype, device=device)
        canvas[..., :th, :tw] = small
        classes = torch.arange(c, device=device).view(c, 1)

        def panels(picks: torch.Tensor) -> torch.Tensor:  # (C, k) images of the batch -> (C, k, *PANEL) bool
            return canvas[picks, classes] if self.multilabel else canvas[picks] == classes.view(c, 1, 1, 1)

        size = torch.stack([torch.full((c, n), height, device=device), torch.full((c, n), width, device=device)], -1)
        self._merge(dice.T, indices.view(1, n).expand(c, n), size, panels)

    def _merge(self, scores: torch.Tensor, index: torch.Tensor, size: torch.Tensor, panels) -> None:
        """The kept and the (C, n) new candidates together, the ``k`` first by (score, index) kept; ``panels(picks)``
        gives the new candidates' thumbnails at (C, k) positions."""
        m, n = self.scores.shape[1], scores.shape[1]
        if n == 0:
            return
        scores, index = torch.cat([self.scores, scores], 1), torch.cat([self.index, index], 1)  # (C, m + n)
        by_index = index.argsort(dim=1, stable=True)  # then by score, stably: (score, index) order
        order = by_index.gather(1, scores.gather(1, by_index).argsort(dim=1, stable=True))[:, : self.k]
        rows = torch.arange(self.num_classes, device=order.device).view(-1, 1)
        new = panels((order - m).clamp(min=0))
        if m:
            new = torch.where((order < m)[..., None, None], self.thumbs[rows, order.clamp(max=m - 1)], new)
        self.thumbs = new
        self.size = torch.cat([self.size, size], 1)[rows, order]
        self.scores, self.index = scores.gather(1, order), index.gather(1, order)

    def gather(self) -> list[list[HardCase]]:
        """Per class, its hard cases over every rank (this process's without DDP), worst first: a collective."""
        parts = all_gather_objects(tuple(t.cpu() for t in (self.scores, self.index, self.size, self.thumbs)))
        merged = HardCases(self.num_classes, self.k, "cpu", self.multilabel)
        rows = torch.arange(self.num_classes).view(-1, 1)
        for scores, index, size, thumbs in parts:
            merged._merge(scores, index, size, lambda picks, thumbs=thumbs: thumbs[rows, picks])
        cases = [[] for _ in range(self.num_classes)]
        for c, ranked in enumerate(cases):
            for score, index, size, thumb in zip(merged.scores[c].tolist(), merged.index[c].tolist(),
                                                 merged.size[c].tolist(), merged.thumbs[c]):
                if score < math.inf:  # fewer than k candidates: the rest of the slots
                    th, tw = panel_size(*size)
                    ranked.append(HardCase(index, score, tuple(size), thumb[:th, :tw].numpy()))
        return cases


def _sample(dataset, index: int, mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), truth (H, W); of a multi-label dataset (C, H, W) of 0, 1 and ``ignore_index``) as
    the evaluation scored them."""
    image, mask = dataset[index]
    if getattr(dataset, "multilabel", False):
        mask = unpack(mask, dataset.num_classes, dataset.ignore_index)
    picture = denormalize(image, mean, std)
    if picture.shape[:2] != mask.shape[-2:]:  # val_resize: the file's own pixels, at the mask's size
        picture = dataset.load_image(index)
    return picture, mask.numpy()


def _row(sample: tuple[np.ndarray, np.ndarray], case: HardCase, c: int, ignore_index: int):
    """(image, truth, prediction) of class ``c`` as ``error_gallery`` draws them, on the thumbnail's pixel grid;
    truth and prediction as label maps (a multi-label channel: c present, -1 absent)."""
    picture, truth = sample
    th, tw = case.predicted.shape
    rows, cols = panel_grid(case.size[0], th).numpy(), panel_grid(case.size[1], tw).numpy()
    rows, cols = rows[rows < truth.shape[-2]], cols[cols < truth.shape[-1]]  # this image's part of a padded batch
    truth = truth[..., rows[:, None], cols]
    if truth.ndim == 3:  # -1: absent, a label of no class
        truth = np.where(truth[c] == 1, c, np.where(truth[c] == ignore_index, ignore_index, -1))
    predicted = np.where(case.predicted[: len(rows), : len(cols)], c, -1)
    return picture[rows[:, None], cols], truth, predicted


def galleries(dataset, cases: list[list[HardCase]] | None, class_names: Sequence[str], k: int,
              mean: Sequence[float], std: Sequence[float], ignore_index: int = 255) -> dict[str, np.ndarray]:
    """{class name: gallery} of each class's first ``k`` hard cases (``HardCases.gather``); classes without one get
    none. Each image is read once, however many classes list it; nothing is predicted."""
    if k < 1 or not cases:
        return {}
    chosen = [ranked[:k] for ranked in cases]
    samples = {i: _sample(dataset, i, mean, std) for i in dict.fromkeys(case.index for r in chosen for case in r)}
    out = {}
    for c, ranked in enumerate(chosen):
        if ranked:
            rows = [(*_row(samples[case.index], case, c, ignore_index),
                     f"{rank}. {Path(dataset.image_paths[case.index]).name}  dice {case.dice:.3f}")
                    for rank, case in enumerate(ranked, 1)]
            out[class_names[c]] = error_gallery(rows, c, class_names, ignore_index)
    return out


def write_report(out_dir: Path, dataset, per_image: tuple[Sequence[int], torch.Tensor] | None,
                 cases: list[list[HardCase]] | None, class_names: Sequence[str], k: int, mean: Sequence[float],
                 std: Sequence[float], ignore_index: int = 255) -> list[Path]:
    """per_image.csv, report.md and, given ``cases`` (``engine.Evaluation.hard_cases``; None: ``report.galleries``
    off), the ``k`` worst images' galleries of an evaluation's ``per_image`` (dataset indices, their matrices:
    ``engine.Evaluation.per_image``) in ``out_dir``; the paths written (none without per-image matrices)."""
    if per_image is None:
        return []
    indices, matrices = per_image
    images = galleries(dataset, cases, class_names, k, mean, std, ignore_index)
    paths = [str(dataset.image_paths[i]) for i in indices]
    written = PerImageReport(paths, list(class_names), matrices).write(out_dir, k, images)
    drawn = "" if cases is not None else ", no galleries (report.galleries=false)"
    log.info("per-image report (the %d worst images per class%s): %s", k, drawn, Path(out_dir) / "report.md")
    return written
