"""TensorBoard output with class names in the tags (``val/dice/<class_name>``)."""

from __future__ import annotations

import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            # A NaN (class never present nor predicted) would draw a broken line; skip it.
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        # Four leading spaces make TensorBoard's markdown keep the table's columns.
        self.writer.add_text(tag, "\n".join("    " + line for line in body.splitlines()), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
