"""Walk a split and collect every problem at once, for ``scripts/check_dataset.py``.

Training stops at the first bad file; a data check should instead list them all: unpaired
files, unreadable images or masks, size mismatches, labels outside the classes and unknown
mask colours, with the per-class pixel and image counts of the pairs that are fine. Each pair
goes through the same routine as the training pass (``segtrain.data.scan.scan_pair``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segtrain.data.folder import FolderDataset
from segtrain.data.scan import iter_scans


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


def check_split(dataset: FolderDataset, num_workers: int = 0) -> SplitReport:
    """Every problem of the split (unpaired files too, when built with ``allow_unpaired=True``)."""
    report = SplitReport(dataset.split, len(dataset), list(getattr(dataset, "unpaired", [])))
    report.pixel_count = np.zeros(dataset.num_classes, dtype=np.int64)
    report.image_count = np.zeros(dataset.num_classes, dtype=np.int64)
    for scan in iter_scans(dataset, dataset.num_classes, dataset.ignore_index, num_workers):
        report.problems += [str(problem) for problem in scan.problems]
        if scan.counts is not None:
            report.pixel_count += scan.counts
            report.image_count += scan.counts > 0
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
