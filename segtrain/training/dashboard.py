"""TensorBoard output with class names in the tags (``val/dice/<class_name>``).

Besides scalars, the dashboard gets a custom-scalars layout (one multi-line chart per metric
with every class in it, so a rare class shows next to the common ones), the confusion matrix
and a fixed set of validation overlays at every evaluation, and an HParams entry at the end.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from segtrain.visualize import (channel_confusion_image, confusion_matrix_image, denormalize, overlay_panel,
                                reliability_diagram, save_jpeg)

PER_CLASS_METRICS = ("dice", "iou", "precision", "recall")


def custom_layout(class_names: Sequence[str]) -> dict:
    per_class = {
        f"{name} per class": ["Multiline", [f"val/{name}/{c}" for c in class_names]] for name in PER_CLASS_METRICS
    }
    per_class["train soft dice per class"] = ["Multiline", [f"train/soft_dice/{c}" for c in class_names]]
    summary = {
        "val means": ["Multiline", ["val/mDice", "val/mIoU", "val/pixel_acc"]],
        "calibration": ["Multiline", ["val/ece", *(f"val/ece/{c}" for c in class_names)]],
        "loss": ["Multiline", ["train/loss", "val/loss", r"train/loss/.*"]],
    }
    return {"per class (val)": per_class, "summary": summary}


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path, class_names: Sequence[str], ignore_index: int = 255,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 tracker=None) -> None:
        self.class_names = list(class_names)
        self.tracker = tracker  # an experiment tracker (segtrain.tracking) that gets every scalar and text too
        self.ignore_index = ignore_index
        self.mean, self.std = list(mean), list(std)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_custom_scalars(custom_layout(self.class_names))

    def scalars(self, values: dict[str, float], step: int) -> None:
        # A NaN (class never present nor predicted) would draw a broken line; skip it.
        kept = {tag: value for tag, value in values.items()
                if value is not None and not (isinstance(value, float) and math.isnan(value))}
        self._tensorboard_scalars(kept, step)
        if self.tracker is not None:
            self.tracker.scalars(kept, step)

    def _tensorboard_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        # Four leading spaces make TensorBoard's markdown keep the table's columns.
        self.writer.add_text(tag, "\n".join("    " + line for line in body.splitlines()), step)
        if self.tracker is not None:
            self.tracker.text(f"{tag}.txt", body)

    def image(self, tag: str, array: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, array, step, dataformats="HWC")

    def photo(self, tag: str, array: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 drawing with photographs in it, stored as JPEG (``visualize.save_jpeg``; TensorBoard
        shows any encoding its browser reads): a few times smaller than ``image``'s PNG in the event file."""
        buffer = io.BytesIO()
        save_jpeg(array, buffer)
        picture = Summary.Image(height=array.shape[0], width=array.shape[1], colorspace=3,
                                encoded_image_string=buffer.getvalue())
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=picture)]), step)

    def evaluation(self, matrix: torch.Tensor, samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   step: int, hard_cases: dict[str, np.ndarray] | None = None, calibration=None) -> None:
        """The confusion matrix, the overlays of the fixed validation samples, each class's worst images
        (``hard_cases.galleries``) and the reliability diagram of a ``calibration.ReliabilityHistogram``."""
        picture = channel_confusion_image if matrix.dim() == 3 else confusion_matrix_image  # multi-label: 2x2 each
        self.image("val/confusion_matrix", picture(matrix, self.class_names), step)
        for name, gallery in (hard_cases or {}).items():
            self.photo(f"val/hard_cases/{name}", gallery, step)
        if calibration is not None:
            self.image("val/reliability", reliability_diagram(*calibration.top_label(), calibration.ece()), step)
        for i, (image, target, pred) in enumerate(samples):
            panel = overlay_panel(denormalize(image, self.mean, self.std), target.numpy(), pred.numpy(),
                                  self.class_names, self.ignore_index)
            self.image(f"val/samples/{i}", panel, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """One HParams row for this run; ``metrics`` are also written as scalars under the same tags."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        finite = {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}
        exp, ssi, sei = hparams_summary(clean, finite)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        self._tensorboard_scalars(finite, 0)  # HParams' own copy: not a step of the run's curves for a tracker

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
