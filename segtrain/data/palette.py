"""Colour-coded masks: an RGB colour per class, turned into class indices.

``dataset.palette`` is either a list with one ``[r, g, b]`` per class (the list index is the
class) or a mapping from colour to class, the colour written ``"r,g,b"``, ``"#rrggbb"`` or as
a list; a mapping may send a colour to ``ignore_index`` (e.g. a border colour).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segtrain.data.files import open_image
from segtrain.errors import check_choice

Color = tuple[int, int, int]


def parse_color(value: Any) -> Color:
    """``"r,g,b"``, ``"#rrggbb"`` or a sequence of three ints in [0, 255]."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("#") and len(text) == 7:
            parts = [int(text[i : i + 2], 16) for i in (1, 3, 5)]
        else:
            parts = [int(p) for p in text.replace(" ", "").split(",")] if text.count(",") == 2 else []
    else:
        try:
            parts = [int(p) for p in value]
        except (TypeError, ValueError):
            parts = []
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(f"dataset.palette: {value!r} is not a colour; write [r, g, b], 'r,g,b' or '#rrggbb'")
    return tuple(parts)  # type: ignore[return-value]


def parse_palette(palette: Any, num_classes: int, ignore_index: int = 255) -> dict[Color, int]:
    """``{(r, g, b): class}`` from either palette form; a colour given twice is an error."""
    if isinstance(palette, Mapping):
        pairs = [(parse_color(color), cls) for color, cls in palette.items()]
    else:
        pairs = [(parse_color(color), cls) for cls, color in enumerate(palette)]
        if len(pairs) != num_classes:
            raise ValueError(f"dataset.palette lists {len(pairs)} colours but dataset.num_classes={num_classes}; "
                             "give one [r, g, b] per class, or a mapping colour -> class")
    table: dict[Color, int] = {}
    for color, cls in pairs:
        if not (isinstance(cls, int) and (0 <= cls < num_classes or cls == ignore_index)):
            raise ValueError(f"dataset.palette: colour {color} -> {cls!r}; classes are 0..{num_classes - 1} "
                             f"or ignore_index {ignore_index}")
        if color in table:
            raise ValueError(f"dataset.palette: colour {color} is given twice (classes {table[color]} and {cls})")
        table[color] = cls
    return table


class ColorDecoder:
    """Maps the colours of an RGB mask to classes with one binary search per pixel."""

    def __init__(self, table: Mapping[Color, int], ignore_index: int = 255, on_unknown_color: str = "error") -> None:
        check_choice("dataset.on_unknown_color", on_unknown_color, ("error", "ignore"))
        keys = np.array([(r << 16) | (g << 8) | b for r, g, b in table], dtype=np.int32)
        order = np.argsort(keys)
        self.keys = keys[order]
        self.classes = np.array(list(table.values()), dtype=np.int32)[order]
        self.ignore_index = ignore_index
        self.on_unknown_color = on_unknown_color

    def __call__(self, rgb: np.ndarray, path: Path | str) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) int32 classes; ``path`` names the file in the error."""
        packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        pos = np.minimum(np.searchsorted(self.keys, packed), len(self.keys) - 1)
        known = self.keys[pos] == packed
        out = self.classes[pos]
        if not known.all():
            if self.on_unknown_color == "ignore":
                out[~known] = self.ignore_index
            else:
                values, counts = np.unique(packed[~known], return_counts=True)
                top = np.argsort(-counts, kind="stable")[:8]
                found = ", ".join(f"({v >> 16}, {(v >> 8) & 255}, {v & 255}) ({c} px)"
                                  for v, c in zip(values[top].tolist(), counts[top].tolist()))
                more = f" and {len(values) - len(top)} more" if len(values) > len(top) else ""
                raise ValueError(f"{path}: colours not in dataset.palette: {found}{more}; add them to the palette "
                                 "or set dataset.on_unknown_color=ignore")
        return out


def read_color_mask(path: Path) -> np.ndarray:
    """An RGB mask as (H, W, 3) uint8, whatever its PNG mode (palette PNGs give their colours)."""
    with open_image(path, "mask") as img:
        return np.asarray(img.convert("RGB"))
