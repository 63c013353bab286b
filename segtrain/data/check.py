"""Walk a split and collect every problem at once, for ``scripts/check_dataset.py``.

Training stops at the first bad file; a data check should instead list them all: unpaired
files, unreadable images or masks, size mismatches, labels outside the classes and unknown
mask colours, with the per-class pixel and image counts of the pairs that are fine and their ignored pixels. Each pair
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
    valid_count: np.ndarray | None = None  # multi-label: (C,) pixels not ignored in each channel, the shares' base
    ignored: int = 0  # pixels training ignores (``scan.PairScan.ignored``), over the pairs without problems
    pixels: int = 0  # all their pixels
    ignore_index: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def check_split(dataset: FolderDataset, num_workers: int = 0) -> SplitReport:
    """Every problem of the split (unpaired files too, when built with ``allow_unpaired=True``)."""
    report = SplitReport(dataset.split, len(dataset), list(getattr(dataset, "unpaired", [])),
                         ignore_index=dataset.ignore_index)
    c = dataset.num_classes
    report.pixel_count = np.zeros(c, dtype=np.int64)
    report.image_count = np.zeros(c, dtype=np.int64)
    if dataset.multilabel:
        report.valid_count = np.zeros(c, dtype=np.int64)
    for scan in iter_scans(dataset, c, dataset.ignore_index, num_workers):
        report.problems += [str(problem) for problem in scan.problems]
        if scan.counts is not None:  # multi-label: (2C,), each channel's positive then valid pixels
            report.ignored, report.pixels = report.ignored + scan.ignored, report.pixels + scan.pixels
            report.pixel_count += scan.counts[:c]
            report.image_count += scan.counts[:c] > 0
            if report.valid_count is not None:
                report.valid_count += scan.counts[c:]
    return report


def format_report(report: SplitReport, class_names: list[str]) -> str:
    lines = [f"split '{report.split}': {report.num_pairs} pairs, "
             + (f"{len(report.problems)} problems" if report.problems else "no problems")]
    lines += [f"  BAD {p}" for p in report.problems]
    if report.pixel_count is not None and report.num_pairs:
        # a class's share of all labelled pixels; a multi-label channel's share of its own valid pixels
        totals = report.valid_count if report.valid_count is not None else \
            np.full(len(class_names), report.pixel_count.sum())
        width = max(len("class"), *(len(n) for n in class_names))
        lines.append(f"  {'class':<{width}}  {'pixels':>12}  {'share':>7}  {'images':>7}")
        for name, px, total, im in zip(class_names, report.pixel_count.tolist(), totals.tolist(),
                                       report.image_count.tolist()):
            lines.append(f"  {name:<{width}}  {px:>12}  {px / max(total, 1):>7.2%}  {im:>7}")
        what = "in every channel" if report.valid_count is not None else f"ignore_index {report.ignore_index}"
        lines.append(f"  ignored ({what}): {report.ignored} pixels, {report.ignored / max(report.pixels, 1):.2%} "
                     f"of all {report.pixels}")
    return "\n".join(lines)
