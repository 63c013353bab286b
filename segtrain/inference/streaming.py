"""Sliding-window prediction of an image larger than memory, one row of windows at a time.

    for y0, probs in stream_probabilities(predictor, read_rows, height, width):   # probs (K, rows, W) float32
        labels = labels_of(probs)                                                  # rows y0 .. y0 + rows - 1

The grid, the blend weights, the window probabilities and the division by the summed weights are those of
``segtrain.inference.windows.sliding_window``, added in the same window order: with the same windows per forward pass
the bands are the in-memory probabilities, bit for bit. ``read_rows(y0, h)`` gives the (h, W, C) uint8 rows of one
row of windows (a ``RasterReader`` window); once that row of windows is added, the rows above the next row's first
window are final and leave as a band. What is held is one row of windows, not the image: the (K, tile_h, W) float32
sums, the (tile_h, W, C) uint8 rows read, one batch of windows normalised (normalising is per pixel: the same numbers
as the whole image's) and the model's activations for it, one band's weight sums, probabilities and labels.

What needs the whole image at once is refused before anything is read (``check_streamable``): test-time scales
(they resize the whole image), ``dataset.val_resize`` (it resizes or pads the whole image), a multi-label model and a
checkpoint's component rules (components cross band borders). ``streamed_reader`` says which inputs
``segtrain.predict`` streams: TIFFs read by windows that are georeferenced or above ``STREAM_PIXELS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segtrain.data.raster import RasterReader, is_tiff, tifffile_module
from segtrain.inference.predictor import Predictor
from segtrain.inference.windows import blend_weights, probabilities_fn, weight_sums, weighted_windows, window_starts

log = logging.getLogger(__name__)
RowReader = Callable[[int, int], np.ndarray]
# Above this many pixels a TIFF is streamed: in memory an image costs ~(4K + 4C + C + 8) bytes a pixel (K class sums,
# the normalised image, the image, the int64 labels), ~600 MB for 3 classes at 4096 x 4096.
STREAM_PIXELS = 4096 * 4096


def stream_refusal(predictor: Predictor) -> str | None:
    """Why ``predictor``'s settings cannot stream an image, naming the key to change; None when they can."""
    options = predictor.options
    if predictor.multilabel:
        return ("a multi-label model: streamed prediction of large rasters writes one label map; predict tiles of "
                "the image instead")
    if tuple(options.scales) != (1.0,):
        return (f"inference.tta.scales={list(options.scales)}: scales resize the whole image, which a streamed "
                "raster never is in memory; set 'inference.tta.scales=[1.0]'")
    if predictor.val_resize is not None:
        return (f"dataset.val_resize={predictor.val_resize}: it resizes or pads the whole image; set "
                "dataset.val_resize=null to stream a large raster")
    if predictor.postprocess is not None:
        return ("the checkpoint's component rules (segtrain.calibrate) need whole components, which cross the bands "
                "a large raster is streamed in; set postprocess.enabled=false to stream it")
    return None


def check_streamable(predictor: Predictor) -> None:
    """``stream_refusal`` as a ``ValueError``."""
    refusal = stream_refusal(predictor)
    if refusal is not None:
        raise ValueError(refusal)


def _normalised(predictor: Predictor, rows: np.ndarray) -> torch.Tensor:
    """(C, h, W) contiguous on the predictor's device, as ``Predictor.__call__`` prepares a whole image."""
    return torch.from_numpy(predictor.transform(image=rows)["image"]).permute(2, 0, 1).contiguous().to(
        predictor.device)


def stream_probabilities(predictor: Predictor, read_rows: RowReader, height: int, width: int
                         ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, (K, rows, W) float32 CPU probabilities) of each band of final rows, top to bottom, with the
    predictor's sliding-window options whatever its ``inference.mode`` (a whole large image is not one pass)."""
    check_streamable(predictor)
    o = predictor.options
    th, tw = min(int(o.tile[0]), height), min(int(o.tile[1]), width)
    ys, xs = window_starts(height, th, o.overlap), window_starts(width, tw, o.overlap)
    probs_fn = probabilities_fn(predictor.model, o.amp_dtype)
    if len(ys) * len(xs) == 1:  # one window: its probabilities unweighted (times 1), as sliding_window returns them
        one = torch.ones((), device=predictor.device)
        yield 0, weighted_windows(probs_fn, _normalised(predictor, read_rows(0, height))[None], o.flips, one)[0].cpu()
        return
    weight = blend_weights(th, tw, o.blend, predictor.device)
    # The sums live in a NumPy array: its memory is the caller's to see (tracemalloc), its size (K, th, W).
    sums = acc = None
    for i, y in enumerate(ys):
        rows = read_rows(y, th)  # (th, W, C) uint8: normalised a batch of windows at a time (the same numbers)
        for j in range(0, len(xs), o.batch_size):
            chunk = xs[j : j + o.batch_size]
            batch = torch.stack([_normalised(predictor, rows[:, x : x + tw]) for x in chunk])  # (B, C, th, tw)
            probs = weighted_windows(probs_fn, batch, o.flips, weight).cpu()  # (B, K, th, tw)
            if sums is None:
                sums = np.zeros((probs.shape[1], th, width), dtype=np.float32)
                acc = torch.from_numpy(sums)
            for x, p in zip(chunk, probs):
                acc[:, :, x : x + tw] += p
        del rows
        end = ys[i + 1] if i + 1 < len(ys) else height
        done = end - y
        yield y, acc[:, :done] / weight_sums(y, end, width, ys, xs, weight.cpu())
        sums[:, : th - done] = sums[:, done:]  # NumPy copies overlapping ranges as if through a buffer
        sums[:, th - done :] = 0


def streamed_reader(path: str | Path, refusal: str | None = None, stream_pixels: int | None = None
                    ) -> RasterReader | None:
    """The reader of an input that ``segtrain.predict`` streams: a TIFF read by windows above ``stream_pixels``
    (default ``STREAM_PIXELS``), or a georeferenced one (its outputs keep the georeference) unless the settings'
    ``refusal`` (``stream_refusal``) says they cannot stream; None for an image read whole. A TIFF above
    ``stream_pixels`` that cannot be read by windows, and a PNG, JPEG or BMP too large for Pillow to decode whole,
    are errors naming the file."""
    path, limit = Path(path), STREAM_PIXELS if stream_pixels is None else stream_pixels
    if not is_tiff(path):
        _refuse_too_large(path)
        return None
    try:
        reader = RasterReader(path, "image")
    except ImportError:  # no tifffile: Pillow reads the file whole, and names it when it is too large
        return None
    except (OSError, ValueError):
        if _tiff_pixels(path) > limit:
            raise
        return None  # small: read whole, by Pillow, which reads some TIFFs tifffile's codecs do not (or names why)
    if reader.pixels > limit:
        return reader
    if reader.geo_tags and refusal is not None:
        log.info("%s: predicted whole, without its georeference (%s)", path, refusal)
    return reader if reader.geo_tags and refusal is None else None


def _tiff_pixels(path: Path) -> int:
    try:
        with tifffile_module().TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagelength) * int(page.imagewidth)
    except Exception:  # unreadable header: the whole-image reader names the problem
        return 0


def _refuse_too_large(path: Path) -> None:
    """Pillow's decompression-bomb guard, with the way out: windows need a tiled TIFF."""
    try:
        with Image.open(path):
            pass
    except Image.DecompressionBombError as err:
        raise OSError(f"{path}: cannot read image ({str(err).rstrip('.')}; a {path.suffix} file cannot be read by "
                      "windows: convert it to a tiled TIFF, which segtrain.predict streams, docs/rasters.md)") from None
    except (OSError, ValueError, SyntaxError):
        pass  # read_image names the problem
