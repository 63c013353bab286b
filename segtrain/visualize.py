"""Pictures for the dashboards: prediction overlays and the confusion matrix, as uint8 arrays.

Rendering uses numpy and Pillow only, so training needs no plotting library.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOUR = (255, 255, 255)
MISSED_COLOUR = (230, 0, 0)  # a class's false negatives
FALSE_POSITIVE_COLOUR = (255, 0, 255)
JPEG_QUALITY = 75  # the galleries: photographs, a few times smaller than as PNG (scripts/bench_report.py)
_SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])  # D65


def cielab(rgb) -> np.ndarray:
    """(..., 3) CIELAB (D65 white) of sRGB colours (..., 3) in 0..255."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _SRGB_TO_XYZ.sum(1)  # relative to the white point: white is (1, 1, 1)
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


@functools.lru_cache(maxsize=8)
def _distinct_colours(count: int) -> np.ndarray:
    """Glasbey et al. (2007), "Colour displays for categorical images": each colour in turn the candidate farthest
    (CIELAB distance) from every colour taken, the gallery marks and the ignore colour included. Candidates: an RGB
    grid of 32 levels, lightness 30-90 (darker and lighter ones vanish on dark image parts and on ignore's white).
    The first colour, dark grey, is the background's as before; a prefix is the same whatever the count."""
    levels = np.linspace(0, 255, 32).round()
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)  # (32768, 3)
    lab = cielab(grid)
    mid = (lab[:, 0] >= 30) & (lab[:, 0] <= 90)
    grid, lab = grid[mid], lab[mid]
    taken = [(68, 68, 68)]
    nearest = np.full(len(grid), np.inf)  # squared distance to the nearest colour taken or avoided
    for colour in (IGNORE_COLOUR, MISSED_COLOUR, FALSE_POSITIVE_COLOUR, taken[0]):
        nearest = np.minimum(nearest, ((lab - cielab(colour)) ** 2).sum(-1))
    while len(taken) < count:
        best = int(nearest.argmax())
        taken.append(tuple(grid[best]))
        nearest = np.minimum(nearest, ((lab - lab[best]) ** 2).sum(-1))
    return np.array(taken[:count], dtype=np.uint8).reshape(-1, 3)


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, distinct up to dozens of classes (``_distinct_colours``)."""
    return _distinct_colours(num_classes).copy()


def save_jpeg(picture: np.ndarray, fp) -> None:
    """A drawing with photographs in it, at ``JPEG_QUALITY``, to a path or a binary file object."""
    Image.fromarray(picture).save(fp, format="JPEG", quality=JPEG_QUALITY)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[:] = IGNORE_COLOUR
    valid = (mask != ignore_index) & (mask < len(palette))
    out[valid] = palette[mask[valid]]
    return out


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) tensor back to (H, W, 3) uint8."""
    img = image.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def legend(width: int, class_names: Sequence[str], palette: np.ndarray, with_ignore: bool = True) -> Image.Image:
    """A strip of colour swatches with the class names, wrapped to ``width`` pixels."""
    font = _font(12)
    row_h, x, y = 18, 6, 4
    strip = Image.new("RGB", (width, row_h + 8), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    entries = [*zip(class_names, map(tuple, palette.tolist()))] + ([("ignore", IGNORE_COLOUR)] if with_ignore else [])
    for name, colour in entries:
        text_w = int(draw.textlength(name, font=font))
        if x + 18 + text_w > width and x > 6:  # wrap
            strip = _grow(strip, row_h)
            draw = ImageDraw.Draw(strip)
            x, y = 6, y + row_h
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour, outline=(0, 0, 0))
        draw.text((x + 16, y), name, fill=(0, 0, 0), font=font)
        x += 16 + text_w + 14
    return strip


def _grow(img: Image.Image, extra: int) -> Image.Image:
    bigger = Image.new("RGB", (img.width, img.height + extra), (255, 255, 255))
    bigger.paste(img, (0, 0))
    return bigger


def channel_colours(layers: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label: ((H, W, 3) float64 colours, (H, W) bool covered) of (C, H, W) boolean layers; a pixel in several
    channels takes the mean of their colours."""
    layers = np.asarray(layers, dtype=bool)
    count = layers.sum(0)
    colours = np.tensordot(np.moveaxis(layers, 0, -1).astype(np.float64), palette[: len(layers)].astype(np.float64),
                           axes=1)
    return colours / np.maximum(count, 1)[..., None], count > 0


def channel_overlay(image: np.ndarray, layers: np.ndarray, palette: np.ndarray, alpha: float = 0.55,
                    ignored: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: every channel of ``layers`` (C, H, W) over ``image`` in its colour; ``ignored`` (H, W)
    pixels white."""
    colours, covered = channel_colours(layers, palette)
    out = image.astype(np.float64)
    out[covered] = alpha * colours[covered] + (1 - alpha) * out[covered]
    if ignored is not None:
        out[ignored] = IGNORE_COLOUR
    return out.round().astype(np.uint8)


def overlay_panel(image: np.ndarray, target: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                  ignore_index: int = 255, alpha: float = 0.55, min_side: int = 192) -> np.ndarray:
    """image | ground truth over the image | prediction over the image, with a colour legend. Multi-label
    targets and decisions (C, H, W): every channel in its colour, overlaps mixed, pixels ignored in every
    channel white."""
    palette = class_palette(len(class_names))
    if target.ndim == 3:
        ignored = (target == ignore_index).all(0)
        row = np.concatenate([image, channel_overlay(image, target == 1, palette, alpha, ignored),
                              channel_overlay(image, pred, palette, alpha)], axis=1)
    else:
        gt = colorize(target, palette, ignore_index)
        pr = colorize(pred, palette, ignore_index=-1)
        blend = lambda colours: (alpha * colours + (1 - alpha) * image).astype(np.uint8)  # noqa: E731
        row = np.concatenate([image, blend(gt), blend(pr)], axis=1)  # (H, 3W, 3)
    scale = max(1, int(np.ceil(min_side / image.shape[0])))
    panel = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
    strip = legend(panel.width, class_names, palette)
    out = Image.new("RGB", (panel.width, panel.height + strip.height), (255, 255, 255))
    out.paste(panel, (0, 0))
    out.paste(strip, (0, panel.height))
    return np.asarray(out)


def confusion_matrix_image(matrix: torch.Tensor, class_names: Sequence[str], cell: int = 56) -> np.ndarray:
    """Row-normalised confusion matrix (rows = true class) with its values and class names."""
    counts = matrix.double().cpu()
    rows = counts.sum(dim=1, keepdim=True)
    norm = torch.where(rows > 0, counts / rows.clamp_min(1), torch.zeros_like(counts)).numpy()
    n = len(class_names)
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(name, font=font)) for name in class_names) + 12
    top = label_w + 20  # column names are drawn rotated
    caption = "rows: true class, columns: predicted"
    width = max(label_w + n * cell + 10, label_w + int(probe.textlength(caption, font=font)) + 10)
    img = Image.new("RGB", (width, top + n * cell + 24), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i in range(n):
        for j in range(n):
            v = float(norm[i, j])
            shade = int(255 - 200 * v)
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((x0 + cell / 2, y0 + cell / 2), f"{v:.2f}", fill=(255, 255, 255) if v > 0.5 else (0, 0, 0),
                      font=font, anchor="mm")
        draw.text((label_w - 6, top + i * cell + cell / 2), class_names[i], fill=(0, 0, 0), font=font, anchor="rm")
    for j, name in enumerate(class_names):
        text = Image.new("RGBA", (label_w + 8, 16), (255, 255, 255, 0))
        ImageDraw.Draw(text).text((2, 1), name, fill=(0, 0, 0), font=font)
        rotated = text.rotate(90, expand=True)
        img.paste(rotated, (label_w + j * cell + cell // 2 - 8, top - rotated.height - 4), rotated)
    draw.text((label_w, top + n * cell + 6), caption, fill=(80, 80, 80), font=font)
    return np.asarray(img)


def channel_confusion_image(matrices: torch.Tensor, class_names: Sequence[str], cell: int = 56) -> np.ndarray:
    """Multi-label: each channel's row-normalised 2x2 matrix (absent/present, ``confusion_matrix_image``) under its
    name, side by side."""
    font = _font(12)
    pictures = []
    for name, matrix in zip(class_names, matrices):
        picture = Image.fromarray(confusion_matrix_image(matrix, [f"not {name}", name], cell))
        titled = Image.new("RGB", (picture.width, picture.height + 18), (255, 255, 255))
        ImageDraw.Draw(titled).text((4, 2), name, fill=(0, 0, 0), font=font)
        titled.paste(picture, (0, 18))
        pictures.append(titled)
    out = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)), (255, 255, 255))
    x = 0
    for picture in pictures:
        out.paste(picture, (x, 0))
        x += picture.width
    return np.asarray(out)


_CAPTION_HEIGHT = 18


def _error_row(image: np.ndarray, target: np.ndarray, pred: np.ndarray, class_index: int, colour: np.ndarray,
               ignore_index: int, alpha: float) -> np.ndarray:
    """image | truth of the class | its misses, false positives and hits, all over the image: (H, 3W, 3)."""
    if image.shape[:2] != target.shape or pred.shape != target.shape:
        raise ValueError(f"error_gallery: image {image.shape}, target {target.shape} and prediction {pred.shape} "
                         "must have the same height and width")
    ignored = target == ignore_index
    is_true, is_pred = (target == class_index) & ~ignored, (pred == class_index) & ~ignored
    marks = [[(is_true, colour)],
             [(is_true & is_pred, colour), (is_true & ~is_pred, np.array(MISSED_COLOUR)),
              (~is_true & is_pred, np.array(FALSE_POSITIVE_COLOUR))]]
    panels = [image]
    for panel_marks in marks:
        panel = image.astype(np.float64)
        for where, paint in [*panel_marks, (ignored, np.array(IGNORE_COLOUR))]:
            panel[where] = alpha * paint + (1 - alpha) * panel[where]
        panels.append(panel.round().astype(np.uint8))
    return np.concatenate(panels, axis=1)  # (H, 3W, 3)


def error_gallery(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]], class_index: int,
                  class_names: Sequence[str], ignore_index: int = 255, min_side: int = 128,
                  alpha: float = 0.6) -> np.ndarray:
    """One class's failures, one image per row: image | truth | prediction, under the row's caption.

    ``rows``: (image uint8 (H, W, 3), target (H, W), prediction (H, W), caption). The truth panel marks
    the class in its palette colour; the prediction panel marks its hits in that colour, its missed
    pixels (false negatives) and its false positives in two colours of their own. Ignored pixels are
    marked as ignored in both, whatever was predicted there: they count for nothing.
    """
    if not rows:
        raise ValueError(f"error_gallery: no rows for class {class_names[class_index]!r}")
    colour = class_palette(len(class_names))[class_index]
    font = _font(12)
    strips = []
    for image, target, pred, caption in rows:
        row = _error_row(image, np.asarray(target), np.asarray(pred), class_index, colour, ignore_index, alpha)
        scale = max(1, int(np.ceil(min_side / row.shape[0])))  # small images are enlarged, never blurred
        picture = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        strip = Image.new("RGB", (picture.width, picture.height + _CAPTION_HEIGHT), (255, 255, 255))
        ImageDraw.Draw(strip).text((4, 2), caption, fill=(0, 0, 0), font=font)
        strip.paste(picture, (0, _CAPTION_HEIGHT))
        strips.append(strip)
    width = max(strip.width for strip in strips)  # narrower rows are padded on the right
    key = legend(width, [f"{class_names[class_index]} missed", "false positive", "correct"],
                 np.array([MISSED_COLOUR, FALSE_POSITIVE_COLOUR, colour], dtype=np.uint8))
    out = Image.new("RGB", (width, sum(strip.height for strip in strips) + key.height), (255, 255, 255))
    y = 0
    for strip in [*strips, key]:
        out.paste(strip, (0, y))
        y += strip.height
    return np.asarray(out)


def reliability_diagram(counts: torch.Tensor, accuracy: torch.Tensor, confidence: torch.Tensor, ece: float,
                        size: int = 300) -> np.ndarray:
    """Accuracy per confidence bin (bars, their shade the bin's share of pixels) against the diagonal of a
    perfectly calibrated model, the gap to each bin's mean confidence outlined; the ECE in the title.
    Inputs are ``ReliabilityHistogram.top_label()``'s (the last bin, confidence exactly 1, joins the one before)."""
    counts, accuracy, confidence = (t.double().clone() for t in (counts, accuracy, confidence))
    if len(counts) > 1:  # p == 1.0 drawn in the top bin
        merged = counts[-2:].sum()
        for values in (accuracy, confidence):
            values[-2] = (values[-2:].nan_to_num() * counts[-2:]).sum() / merged if merged > 0 else math.nan
        counts[-2] = merged
        counts, accuracy, confidence = counts[:-1], accuracy[:-1], confidence[:-1]
    bins, margin, top = len(counts), 34, 24
    img = Image.new("RGB", (size + margin + 10, size + top + margin), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(11)
    x0, y0 = margin, top + size  # the plot's origin (confidence 0, accuracy 0)
    share = counts / counts.sum().clamp_min(1)
    width = size / bins
    for b in range(bins):
        if counts[b] == 0:
            continue
        left, right = x0 + b * width, x0 + (b + 1) * width - 1
        shade = int(230 - 180 * min(1.0, float(share[b]) * 4))  # darker where more pixels fall
        draw.rectangle([left, y0 - float(accuracy[b]) * size, right, y0], fill=(shade, shade, 255), outline=(60, 60, 160))
        draw.line([left, y0 - float(confidence[b]) * size, right, y0 - float(confidence[b]) * size],
                  fill=(213, 94, 0), width=2)
    draw.line([x0, y0, x0 + size, y0 - size], fill=(120, 120, 120), width=1)  # perfect calibration
    draw.rectangle([x0, y0 - size, x0 + size, y0], outline=(0, 0, 0))
    for tick in (0.0, 0.5, 1.0):
        draw.text((x0 + tick * size, y0 + 4), f"{tick:g}", fill=(0, 0, 0), font=font, anchor="mt")
        draw.text((x0 - 4, y0 - tick * size), f"{tick:g}", fill=(0, 0, 0), font=font, anchor="rm")
    draw.text((x0 + size / 2, y0 + 18), "confidence (top label)", fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((x0, 6), f"ECE {ece:.4f}  bars: accuracy, orange: mean confidence", fill=(0, 0, 0), font=font)
    return np.asarray(img)
