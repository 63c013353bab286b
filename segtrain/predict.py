"""``python -m segtrain.predict checkpoint=<path> input=<...> output=<folder> [overrides]``: masks for new images.

    python -m segtrain.predict checkpoint=outputs/.../best.pt input=/data/new output=/data/pred
    python -m segtrain.predict checkpoint=... input=big.tif output=pred/ inference.mode=slide inference.tile=512
    python -m segtrain.predict checkpoint=... input=list.txt output=pred/ 'inference.tta.flips=[h]' \\
        'inference.tta.scales=[0.75,1,1.25]' save.probabilities=true

``Predictor`` (``segtrain.inference.predictor``, also importable from here) segments one image in memory.
The model, its class names, normalisation and inference settings come from the checkpoint; no
dataset is needed. ``inference.*`` and ``dataset.*`` overrides change the checkpoint's settings
for this run; the other keys are configs/predict.yaml's. Each image gives ``<name>.png`` (class
indices), ``<name>_color.png`` and, if asked, an overlay and its probabilities (``segtrain.inference.writers``),
named after the input with its sub-folders. A TIFF that is georeferenced or above 4096x4096 pixels is streamed by
windows into ``<name>.tif`` and ``<name>_color.tif``, tiled and with its georeference, in memory bounded by one row of
windows (``segtrain.inference.streaming``, docs/rasters.md). Exit status 0 when every image was predicted, 1 when
some were skipped (each named in the log), 2 when the run could not start or stopped on an error
(``on_error=stop``), which is printed without a traceback, 75 when SIGTERM or Ctrl-C stopped it after
the image in progress (the summary says so; ``save.skip_existing=true`` continues where it stopped).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from segtrain.atomic import NoSpaceLeft
from segtrain.build import palette_for
from segtrain.config import compose_config, split_overrides
from segtrain.data.folder import read_image
from segtrain.data.inputs import LIST_SUFFIXES, check_output_dir, find_inputs
from segtrain.data.raster import RasterReader
from segtrain.errors import check_choice
from segtrain.inference.predictor import Predictor
from segtrain.inference.streaming import check_streamable, stream_probabilities, stream_refusal, streamed_reader
from segtrain.inference.windows import labels_of
from segtrain.inference.writers import MultilabelWriter, PredictionWriter
from segtrain.training.signals import STOPPED_EXIT_CODE, StopSignals

log = logging.getLogger("segtrain.predict")


@dataclass
class Summary:
    predicted: int = 0
    skipped: int = 0  # unreadable or wrong images, named in the log
    existing: int = 0  # outputs already there (save.skip_existing)
    seconds: float = 0.0
    pixels: np.ndarray | None = None  # per predicted label (multi-label: per channel, its present pixels)
    image_pixels: int = 0  # of the predicted images
    stopped: str | None = None  # the signal that stopped the run between two images

    def line(self, output: Path) -> str:
        speed = self.predicted / self.seconds if self.seconds else 0.0
        stop = (f"; stopped by {self.stopped}: run it again with save.skip_existing=true to predict the rest"
                if self.stopped else "")
        return (f"{self.predicted} images predicted, {self.skipped} skipped, {self.existing} already done, "
                f"{speed:.2f} images/s; outputs in {output}{stop}")


def predict_folder(predictor: Predictor, pcfg: DictConfig) -> Summary:
    """Every input of ``pcfg.input`` through ``predictor`` into ``pcfg.output``."""
    check_choice("on_error", pcfg.on_error, ("auto", "skip", "stop"))
    images, base = find_inputs(pcfg.input)
    output = Path(pcfg.output).expanduser()
    check_output_dir(output, base, pcfg.input)
    single = Path(pcfg.input).is_file() and Path(pcfg.input).suffix.lower() not in LIST_SUFFIXES
    on_error = ("stop" if single else "skip") if pcfg.on_error == "auto" else pcfg.on_error
    kinds = [kind for kind in ("color", "overlay", "probabilities") if pcfg.save.get(kind)]
    names = predictor.class_names
    writer = (MultilabelWriter if predictor.multilabel else PredictionWriter)(
        output, names, palette_for(predictor.cfg, len(names)), kinds)
    writer.check_names((item.key, item.path) for item in images)
    writer.write_legend()
    summary = Summary(pixels=np.zeros(len(names), dtype=np.int64))
    start = time.perf_counter()
    with StopSignals((signal.SIGTERM, signal.SIGINT)) as stop:  # finish the image in progress, then stop
        for item in tqdm(images, desc="predict", unit="img", disable=not pcfg.progress, dynamic_ncols=True):
            if stop.received:
                summary.stopped = stop.received
                break
            _predict_one(predictor, writer, item, pcfg, on_error, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def _predict_one(predictor: Predictor, writer: PredictionWriter, item, pcfg: DictConfig, on_error: str,
                 summary: Summary) -> None:
    """One image through the predictor into its files, counted in ``summary``; an unreadable one skipped (named in the
    log) or, with ``on_error=stop``, raised. A large or georeferenced TIFF is streamed (``_stream_one``)."""
    try:
        reader = streamed_reader(item.path, stream_refusal(predictor))
    except (OSError, ValueError) as err:
        return _skip(err, on_error, summary)
    if pcfg.save.skip_existing and writer.done(item.key, raster=reader is not None):
        summary.existing += 1
        return
    if reader is not None:
        check_streamable(predictor)  # a setting, not the file: it stops the run
        try:
            with reader:
                reader.image(0, 0, 1, 1, predictor.in_channels)  # the band count, before any output
                _stream_one(predictor, writer, item.key, reader, summary)
        except NoSpaceLeft:
            raise
        except (OSError, ValueError) as err:  # the file (a segment that does not decode), named
            _skip(err, on_error, summary)
        return
    try:
        image = read_image(item.path, predictor.in_channels)
    except (OSError, ValueError) as err:
        return _skip(err, on_error, summary)
    probs = predictor(image)
    labels = predictor.labels(probs).cpu().numpy()
    writer.write(item.key, image, labels, probs.cpu().numpy() if "probabilities" in writer.kinds else None)
    summary.image_pixels += labels.shape[-2] * labels.shape[-1]
    if labels.ndim == 3:  # multi-label: each channel's present pixels
        summary.pixels += labels.reshape(len(labels), -1).sum(1)
    else:
        summary.pixels += np.bincount(labels.ravel(), minlength=len(summary.pixels))[: len(summary.pixels)]
    summary.predicted += 1


def _skip(err: Exception, on_error: str, summary: Summary) -> None:
    """An unreadable image: named in the log and counted, or with ``on_error=stop`` raised."""
    if on_error == "stop":
        raise err
    log.warning("skipped %s", err)
    summary.skipped += 1


def _stream_one(predictor: Predictor, writer: PredictionWriter, key: str, reader: RasterReader,
                summary: Summary) -> None:
    """A raster by windows, band by band into tiled TIFFs (``segtrain.inference.streaming``), counted in ``summary``."""
    height, width = reader.height, reader.width
    counts = np.zeros(len(summary.pixels), dtype=np.int64)

    def read(y: int, rows: int) -> np.ndarray:
        return reader.image(y, 0, rows, width, predictor.in_channels)

    def bands():
        for _, probs in stream_probabilities(predictor, read, height, width):
            labels = labels_of(probs).numpy()
            counts[:] += np.bincount(labels.ravel(), minlength=len(counts))[: len(counts)]
            yield labels

    skipped = [kind for kind in ("overlay", "probabilities") if kind in writer.kinds]
    log.info("%s: %dx%d%s, streamed by windows%s", reader.path, width, height,
             ", georeferenced" if reader.geo_tags else "", f" (no {' nor '.join(skipped)})" if skipped else "")
    writer.write_raster(key, height, width, bands(), reader.geo_tags)
    summary.pixels += counts
    summary.image_pixels += height * width
    summary.predicted += 1


def _share_table(names: list[str], pixels: np.ndarray, image_pixels: int) -> str:
    """Each class's pixels and their share of the images' pixels (multi-label channels overlap: shares add up to
    more than 100% where they do)."""
    total = max(image_pixels, 1)
    width = max(len("class"), *(len(n) for n in names))
    return "\n".join([f"{'class':<{width}}  {'pixels':>12}  {'share':>7}"] +
                     [f"{n:<{width}}  {int(p):>12}  {p / total:>7.2%}" for n, p in zip(names, pixels)])


USAGE = "usage: python -m segtrain.predict checkpoint=<path> input=<image|folder|glob|list> output=<folder> [key=value ...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        model_overrides, run_overrides = split_overrides(argv)
        pcfg = compose_config(run_overrides, config_name="predict")
        missing = [key for key in ("checkpoint", "input", "output") if OmegaConf.is_missing(pcfg, key)]
        if missing:
            print(f"{USAGE}\nmissing: {', '.join(missing)}", file=sys.stderr)
            return 2
        predictor = Predictor.from_checkpoint(pcfg.checkpoint, model_overrides, pcfg.device)
        o = predictor.options
        tiles = f" {o.tile[0]}x{o.tile[1]} windows, overlap {o.overlap}, {o.blend} blend, {o.batch_size} per batch"
        log.info("%s on %s: %s%s, flips %s, scales %s, amp %s", pcfg.checkpoint, predictor.device, o.mode,
                 tiles if o.mode == "slide" else "", list(o.flips) or "none", list(o.scales), o.amp_dtype or "none")
        summary = predict_folder(predictor, pcfg)
    except (OSError, ValueError, RuntimeError, HydraException, OmegaConfBaseException) as err:
        # Each of these names the file, key or value at fault; a traceback would only bury it.
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.line(Path(pcfg.output)))
    if summary.predicted:
        table = _share_table(predictor.class_names, summary.pixels, summary.image_pixels)
        print("predicted pixels per class:\n" + table)
    return STOPPED_EXIT_CODE if summary.stopped else 1 if summary.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
