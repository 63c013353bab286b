"""The images where a class fails most: predicted again and drawn, one gallery per class.

An evaluation keeps every image's confusion matrix (``per_image.PerImageConfusion``), not its prediction;
the few worst images per class are run through the model once more here (each image once, however many
classes list it) and drawn by ``visualize.error_gallery``: image | truth | prediction with the class's
misses and false positives marked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from segtrain.analysis.per_image import PerImageReport, per_image_scores, worst_images
from segtrain.data.multilabel import unpack
from segtrain.inference import InferenceOptions, scored_logits
from segtrain.metrics import decide
from segtrain.runtime import Runtime
from segtrain.visualize import denormalize, error_gallery

log = logging.getLogger(__name__)


@torch.no_grad()
def _rows(model, dataset, indices: Sequence[int], rt: Runtime, inference: InferenceOptions | None,
          mean: Sequence[float], std: Sequence[float]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{dataset index: (image uint8 (H, W, 3), truth, prediction)} of ``indices``, one forward pass each; of a
    multi-label dataset the truth (C, H, W) of 0, 1 and ``ignore_index`` and the decisions (C, H, W)."""
    model.eval()
    rows = {}
    multilabel = getattr(dataset, "multilabel", False)
    for index in dict.fromkeys(indices):
        image, mask = dataset[index]
        if multilabel:
            mask = unpack(mask, dataset.num_classes, dataset.ignore_index)
        images, masks = rt.to_device(image[None], mask[None])
        with rt.autocast():
            pred = decide(scored_logits(model, images, masks.shape[-2:], inference), multilabel)[0].cpu().numpy()
        picture = denormalize(image, mean, std)
        if picture.shape[:2] != mask.shape[-2:]:  # val_resize: the file's own pixels, at the mask's size
            picture = dataset.load_image(index)
        rows[index] = (picture, mask.numpy(), pred)
    return rows


def galleries(model, dataset, indices: Sequence[int], matrices: torch.Tensor, class_names: Sequence[str], k: int,
              rt: Runtime, inference: InferenceOptions | None, mean: Sequence[float], std: Sequence[float],
              ignore_index: int = 255) -> dict[str, np.ndarray]:
    """{class name: gallery} of the ``k`` worst images per class (``per_image.worst_images``), ``indices``
    the dataset indices of ``matrices``' rows. Classes without a qualifying image get none."""
    if k < 1:
        return {}
    scores = per_image_scores(matrices)
    worst = worst_images(scores, k)
    rows = _rows(model, dataset, [indices[r] for ranked in worst for r in ranked], rt, inference, mean, std)
    out = {}
    for c, ranked in enumerate(worst):
        if ranked:
            entries = [(*_class_row(rows[indices[r]], c, ignore_index), f"{rank}. "
                        f"{Path(dataset.image_paths[indices[r]]).name}  dice {float(scores['dice'][r, c]):.3f}")
                       for rank, r in enumerate(ranked, 1)]
            out[class_names[c]] = error_gallery(entries, c, class_names, ignore_index)
    return out


def _class_row(row: tuple[np.ndarray, np.ndarray, np.ndarray], c: int, ignore_index: int):
    """(image, truth, prediction) as ``error_gallery`` draws class ``c``: label maps as they are; a multi-label
    row's channel ``c`` as a label map in which c is present and C (no class) absent."""
    picture, truth, pred = row
    if truth.ndim == 2:
        return row
    absent = truth.shape[0]
    labels = np.where(truth[c] == 1, c, np.where(truth[c] == ignore_index, ignore_index, absent))
    return picture, labels, np.where(pred[c], c, absent)


def write_report(out_dir: Path, model, dataset, per_image: tuple[Sequence[int], torch.Tensor] | None,
                 class_names: Sequence[str], k: int, rt: Runtime, inference: InferenceOptions | None,
                 mean: Sequence[float], std: Sequence[float], ignore_index: int = 255) -> list[Path]:
    """per_image.csv, report.md and the ``k`` worst images' galleries (``galleries``) of an evaluation's
    ``per_image`` (dataset indices, their matrices: ``engine.Evaluation.per_image``) in ``out_dir``; the paths
    written (none without per-image matrices)."""
    if per_image is None:
        return []
    indices, matrices = per_image
    images = galleries(model, dataset, indices, matrices, class_names, k, rt, inference, mean, std, ignore_index)
    paths = [str(dataset.image_paths[i]) for i in indices]
    written = PerImageReport(paths, list(class_names), matrices).write(out_dir, k, images)
    log.info("per-image report (the %d worst images per class): %s", k, Path(out_dir) / "report.md")
    return written
