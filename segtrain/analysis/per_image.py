"""Every evaluated image's own confusion matrix, its per-class scores, and the report of the worst images.

The dataset-level matrix (``metrics.ConfusionMatrix``) says how well a class is segmented on the whole
split; it cannot say which images a class fails on. Keeping one (C, C) matrix per image costs C*C counts
per image rather than the predictions themselves; the worst images' predictions are kept as they pass, shrunk,
by ``hard_cases.HardCases`` to be drawn.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from segtrain.atomic import atomic_write
from segtrain.distributed import all_gather_objects
from segtrain.metrics import channel_counts, channel_decisions, channel_scores, class_argmax, class_scores
from segtrain.visualize import save_jpeg


def _sorted_by_index(indices: list[int], matrices: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """``indices`` ascending with their rows of ``matrices``; a repeated index is an error, since an
    image scored twice would count twice in every sum taken over the report."""
    order = sorted(range(len(indices)), key=indices.__getitem__)
    ordered = [indices[i] for i in order]
    repeated = sorted({a for a, b in zip(ordered, ordered[1:]) if a == b})
    if repeated:
        raise ValueError(f"PerImageConfusion: dataset indices {repeated[:10]} were updated more than once")
    return ordered, matrices[torch.tensor(order, dtype=torch.long)] if order else matrices


class PerImageConfusion:
    """(C, C) count matrices (rows = true class, columns = predicted), one per image, kept on the device.

    ``update`` costs one bincount per batch and never synchronises with the host; ``result`` copies
    everything to the CPU once.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None,
                 multilabel: bool = False) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else None
        self.multilabel = multilabel  # one (C, 2, 2) matrix per image instead: a 2x2 per channel
        self._matrices: list[torch.Tensor] = []  # one (N, C, C) int64 tensor per batch
        self._indices: list[int] = []

    @torch.no_grad()
    def update(self, preds_or_logits: torch.Tensor, target: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """``preds_or_logits``: logits (N, C, H, W), arg-maxed here, or labels (N, H, W); ``target``
        (N, H, W); ``indices``: the dataset indices of the N images. Multi-label: logits or decisions and targets
        all (N, C, H, W). Returns the batch's (N, C, C) (multi-label (N, C, 2, 2)) matrices, on the device."""
        if len(indices) != target.shape[0]:
            raise ValueError(f"PerImageConfusion: {len(indices)} indices for a batch of {target.shape[0]} images")
        if self.multilabel:
            preds = preds_or_logits if preds_or_logits.dtype == torch.bool else channel_decisions(preds_or_logits)
            if preds.shape != target.shape or target.dim() != 4 or target.shape[1] != self.num_classes:
                raise ValueError(f"PerImageConfusion: prediction {tuple(preds.shape)} and target "
                                 f"{tuple(target.shape)} must both be (N, {self.num_classes}, H, W)")
            self._matrices.append(channel_counts(preds, target, self.ignore_index).to(self.device or target.device))
            self._indices.extend(int(i) for i in indices)
            return self._matrices[-1]
        preds = class_argmax(preds_or_logits) if preds_or_logits.dim() == target.dim() + 1 else preds_or_logits
        if preds.shape != target.shape or target.dim() != 3:
            raise ValueError(f"PerImageConfusion: prediction {tuple(preds.shape)} and target {tuple(target.shape)} "
                             "must both be (N, H, W)")
        if self.device is not None:
            preds, target = preds.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
        n, batch = self.num_classes, target.shape[0]
        preds, target = preds.long(), target.long()
        image = torch.arange(batch, device=target.device).view(batch, 1, 1)
        # Out-of-range labels go to the dropped bin with the ignored pixels: with the image offset they
        # would otherwise land in the next image's counts.
        valid = (target != self.ignore_index) & (target >= 0) & (target < n) & (preds >= 0) & (preds < n)
        index = torch.where(valid, (image * n + target) * n + preds, batch * n * n)  # (N, H, W)
        counts = torch.bincount(index.flatten(), minlength=batch * n * n + 1)[: batch * n * n]
        self._matrices.append(counts.view(batch, n, n))
        self._indices.extend(int(i) for i in indices)
        return self._matrices[-1]

    def result(self) -> tuple[list[int], torch.Tensor]:
        """(dataset indices ascending, their (M, C, C) int64 matrices on the CPU) of this process."""
        if not self._matrices:
            shape = (self.num_classes, 2, 2) if self.multilabel else (self.num_classes, self.num_classes)
            return [], torch.zeros((0, *shape), dtype=torch.int64)
        return _sorted_by_index(self._indices, torch.cat(self._matrices).cpu())

    def gather(self) -> tuple[list[int], torch.Tensor]:
        """``result`` of every rank together, index-sorted, on every rank (``result`` in a single process)."""
        parts = all_gather_objects(self.result())
        indices = [i for part_indices, _ in parts for i in part_indices]
        return _sorted_by_index(indices, torch.cat([matrices for _, matrices in parts]))


def per_image_scores(matrices: torch.Tensor) -> dict[str, torch.Tensor]:
    """(M, C) ``dice`` and ``iou`` (float64; NaN where the class is neither in an image's truth nor
    predicted in it) and int64 ``true_pixels`` (tp + fn), ``predicted_pixels`` (tp + fp). Multi-label
    (M, C, 2, 2) matrices give the same of each channel's present class."""
    if matrices.dim() == 4 and matrices.shape[2:] == (2, 2):
        counts = matrices.long().cpu()
        return {**{k: v for k, v in channel_scores(counts).items() if k in ("dice", "iou")},
                "true_pixels": counts[..., 1, :].sum(-1), "predicted_pixels": counts[..., :, 1].sum(-1)}
    if matrices.dim() != 3 or matrices.shape[1] != matrices.shape[2]:
        raise ValueError(f"per_image_scores: matrices {tuple(matrices.shape)} must be (M, C, C) or (M, C, 2, 2)")
    counts = matrices.long().cpu()
    scores = class_scores(counts)
    return {
        "dice": scores["dice"],
        "iou": scores["iou"],
        "true_pixels": counts.sum(dim=2),  # rows are the true class
        "predicted_pixels": counts.sum(dim=1),
    }


def worst_images(scores: dict[str, torch.Tensor], k: int) -> list[list[int]]:
    """Per class, the rows of the ``k`` images with the lowest Dice among those where the class is in
    the truth or the prediction; ties keep row order. Fewer than ``k`` when fewer images qualify."""
    if k < 0:
        raise ValueError(f"worst_images: k={k}, expected 0 or more")
    present = (scores["true_pixels"] + scores["predicted_pixels"]) > 0  # (M, C)
    worst = []
    for c in range(present.shape[1]):
        rows = present[:, c].nonzero().flatten()
        order = torch.sort(scores["dice"][rows, c], stable=True).indices
        worst.append(rows[order[:k]].tolist())
    return worst


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def gallery_file(class_name: str) -> str:
    """``gallery_<class>.jpg``, with characters that are unsafe in a file name or a Markdown link as ``_``."""
    return f"gallery_{re.sub(r'[^A-Za-z0-9_.-]', '_', class_name)}.jpg"


@dataclass
class PerImageReport:
    """The per-image scores of an evaluation: ``image_paths[i]`` is the image of ``matrices[i]`` (M, C, C)."""

    image_paths: list[str]
    class_names: list[str]
    matrices: torch.Tensor

    def __post_init__(self) -> None:
        shape, m, c = tuple(self.matrices.shape), len(self.image_paths), len(self.class_names)
        if shape not in ((m, c, c), (m, c, 2, 2)):
            raise ValueError(f"PerImageReport: matrices {shape} do not match {m} image paths and {c} class names "
                             "(expected (M, C, C), or (M, C, 2, 2) for multi-label channels)")

    @cached_property
    def scores(self) -> dict[str, torch.Tensor]:
        return per_image_scores(self.matrices)

    def write_csv(self, path: str | Path) -> Path:
        """``image,class,dice,iou,true_pixels,predicted_pixels``, one row per image and class, image-major."""
        columns = [self.scores[key].tolist() for key in ("dice", "iou", "true_pixels", "predicted_pixels")]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "class", "dice", "iou", "true_pixels", "predicted_pixels"])
                for i, image in enumerate(self.image_paths):
                    for c, name in enumerate(self.class_names):
                        dice, iou, true, predicted = (column[i][c] for column in columns)
                        writer.writerow([image, name, _cell(dice), _cell(iou), true, predicted])

        return atomic_write(path, write)

    def markdown(self, k: int, galleries: dict[str, str] | None = None) -> str:
        """report.md: per class, a table of the ``k`` worst images by Dice and its gallery when given."""
        galleries = galleries or {}
        dice, iou = self.scores["dice"].tolist(), self.scores["iou"].tolist()
        true, predicted = self.scores["true_pixels"].tolist(), self.scores["predicted_pixels"].tolist()
        lines = ["# Per-image evaluation", "",
                 f"{len(self.image_paths)} images. For each class, the {k} images with the lowest Dice among those "
                 "where the class is in the truth or the prediction (every score: per_image.csv).", ""]
        for c, (name, ranked) in enumerate(zip(self.class_names, worst_images(self.scores, k))):
            lines += [f"## {name}", ""]
            if name in galleries:
                lines += [f"![{name}: worst images]({galleries[name]})", ""]
            if not ranked:
                lines += [f"No image has {name} in its truth or its prediction.", ""]
                continue
            lines += ["| rank | image | dice | iou | true pixels | predicted pixels |",
                      "|---:|---|---:|---:|---:|---:|"]
            for rank, r in enumerate(ranked, 1):
                image = self.image_paths[r].replace("|", "\\|")  # a "|" would end the table cell
                lines.append(f"| {rank} | {image} | {dice[r][c]:.4f} | {iou[r][c]:.4f} | {true[r][c]} "
                             f"| {predicted[r][c]} |")
            lines.append("")
        return "\n".join(lines)

    def write(self, out_dir: str | Path, k: int, gallery_images: dict[str, np.ndarray] | None = None) -> list[Path]:
        """The galleries (``gallery_<class>.jpg``, ``visualize.save_jpeg``), per_image.csv and report.md in
        ``out_dir``; the paths written. Galleries come first and the report last, so a failure leaves the previous
        report whole."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        gallery_images = gallery_images or {}
        unknown = sorted(set(gallery_images) - set(self.class_names))
        if unknown:
            raise ValueError(f"PerImageReport.write: galleries for {unknown}, not classes of {self.class_names}")
        files = {name: gallery_file(name) for name in gallery_images}
        if len(set(files.values())) < len(files):
            raise ValueError(f"PerImageReport.write: classes {sorted(files)} share gallery file names {files}")
        written = []
        for name, picture in gallery_images.items():
            if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
                raise ValueError(f"PerImageReport.write: gallery of {name!r} is {picture.dtype} {picture.shape}, "
                                 "expected uint8 (H, W, 3)")
            written.append(atomic_write(out_dir / files[name], lambda tmp, picture=picture: save_jpeg(picture, tmp)))
        written.append(self.write_csv(out_dir / "per_image.csv"))
        text = self.markdown(k, files)
        written.append(atomic_write(out_dir / "report.md", lambda tmp: tmp.write_text(text + "\n")))
        return written
