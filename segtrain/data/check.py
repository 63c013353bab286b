"""Walk a split and collect every problem at once, for ``scripts/check_dataset.py``.

Training stops at the first bad file; a data check should instead list them all: unpaired
files, unreadable images or masks, size mismatches, labels outside the classes and unknown
mask colours, with the per-class pixel and image counts of the pairs that are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from segtrain.data.folder import FolderDataset
from segtrain.data.masks import bad_label_message


@dataclass
class SplitReport:
    split: str
    num_pairs: int = 0
    problems: list[str] = field(default_factory=list)
    pixel_count: np.ndarray | None = None  # (C,) over the pairs without problems
    image_count: np.ndarray | None = None  # (C,) images containing each class

    @property
    def ok(self) -> bool:
        return not self.problems


class _PairCheck(torch.utils.data.Dataset):
    """One pair's problems and class counts, computed in a worker."""

    def __init__(self, dataset: FolderDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[str], np.ndarray | None]:
        ds, problems = self.dataset, []
        image = mask = None
        try:
            image = ds.load_image(index)
        except (OSError, ValueError) as err:
            problems.append(str(err))
        try:
            mask = ds.decoder.decode(ds.mask_paths[index])
        except (OSError, ValueError) as err:
            problems.append(str(err))
        if image is not None and mask is not None and image.shape[:2] != mask.shape:
            problems.append(f"{ds.mask_paths[index]}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                            f"image {ds.image_paths[index].name} size {image.shape[1]}x{image.shape[0]}")
        counts = None
        if mask is not None:
            bad = ds.decoder.bad_pixels(mask)
            if bad is not None and ds.decoder.on_bad_label == "error":
                problems.append(bad_label_message(ds.mask_paths[index], mask[bad], ds.num_classes, ds.ignore_index))
            else:
                labels = mask[(mask >= 0) & (mask < ds.num_classes)]
                counts = np.bincount(labels.ravel(), minlength=ds.num_classes).astype(np.int64)
        return problems, counts if not problems else None


def _unchanged(item):
    return item


def check_split(dataset: FolderDataset, num_workers: int = 0) -> SplitReport:
    """Every problem of the split (unpaired files too, when built with ``allow_unpaired=True``)."""
    report = SplitReport(dataset.split, len(dataset), list(getattr(dataset, "unpaired", [])))
    report.pixel_count = np.zeros(dataset.num_classes, dtype=np.int64)
    report.image_count = np.zeros(dataset.num_classes, dtype=np.int64)
    checks = _PairCheck(dataset)
    items = (checks[i] for i in range(len(checks))) if num_workers == 0 else torch.utils.data.DataLoader(
        checks, batch_size=None, num_workers=num_workers, collate_fn=_unchanged)
    for problems, counts in items:
        report.problems += problems
        if counts is not None:
            report.pixel_count += counts
            report.image_count += counts > 0
    return report


def format_report(report: SplitReport, class_names: list[str]) -> str:
    lines = [f"split '{report.split}': {report.num_pairs} pairs, "
             + (f"{len(report.problems)} problems" if report.problems else "no problems")]
    lines += [f"  BAD {p}" for p in report.problems]
    if report.pixel_count is not None and report.num_pairs:
        total = max(int(report.pixel_count.sum()), 1)
        width = max(len("class"), *(len(n) for n in class_names))
        lines.append(f"  {'class':<{width}}  {'pixels':>12}  {'share':>7}  {'images':>7}")
        for name, px, im in zip(class_names, report.pixel_count.tolist(), report.image_count.tolist()):
            lines.append(f"  {name:<{width}}  {px:>12}  {px / total:>7.2%}  {im:>7}")
    return "\n".join(lines)
