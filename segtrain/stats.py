"""``python -m segtrain.stats [overrides]``: the class statistics and weights a run would use.

Takes the same overrides as ``python -m segtrain`` and composes the same config, builds the
training split through the same code (so the synthetic dataset is generated if needed),
counts it with the same cached one-pass class counts and prints, per class, the counts,
the weight under every strategy, the weights the configured strategy would train with and
how many pixels are ignored; then exits without training. The counts are cached beside the dataset (or in
``dataset.cache_dir``), so a second call reads no mask and says so.

    python -m segtrain.stats                                  # default synthetic dataset
    python -m segtrain.stats weights=effective_num weights.normalize=mean
    python -m segtrain.stats dataset=folder dataset.root=/data/mine dataset.num_classes=4

Nothing is written under ``outputs/``: no run directory, no ``.hydra/``, no log file.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain import distributed
from segtrain.build import class_weights_of, dataset_split, resolve_num_workers, stats_of
from segtrain.config import CONFIG_DIR
from segtrain.config.checks import class_names_of
from segtrain.data.scan import image_pixel_counts, lookup_cache
from segtrain.data.scan_cache import SplitCounts

# A report has no run directory: Hydra's files would otherwise land in a fresh
# outputs/<date>/<time>/. Put before the user's overrides, so that their hydra.* keys still win.
_NO_RUN_DIR = [
    "hydra.run.dir=.",
    # -m still writes multirun.yaml into the sweep directory, so that goes to the temp dir.
    f"hydra.sweep.dir={Path(tempfile.gettempdir()) / 'segtrain-stats'}",
    "hydra.sweep.subdir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
    "~hydra.callbacks.run_start",  # nothing is trained: no run directory to check or lock
]


def _worker_device(name: str) -> torch.device:
    # Only decides the worker count: a CUDA device named on a machine without one is the
    # training run's error to raise, not this report's.
    return distributed.device_for(name) if name == "auto" else torch.device(name)


def class_stats_report(cfg: DictConfig) -> str:
    """The text ``python -m segtrain.stats`` prints for the composed training config ``cfg``."""
    ds, tr = cfg.dataset, cfg.trainer
    class_names = class_names_of(ds)
    train_set = dataset_split(ds, ds.train_split)
    num_workers = resolve_num_workers(tr.num_workers, _worker_device(tr.device))
    width, cache_dir = train_set.count_columns, ds.get("cache_dir")
    index = getattr(train_set, "index", None)  # shards: the index holds the sums
    cache_file, _, split = (None, None, None) if index is not None else \
        lookup_cache(train_set, width, ds.ignore_index, cache_dir)
    if index is not None:
        stats, origin = index.stats(), f"read from the shard index {index.path}, no mask decoded"
    elif split is not None:
        stats = stats_of(train_set, split.counts)
        origin = f"cached: read from {cache_file}, no mask decoded"
    else:
        start = time.perf_counter()
        split = image_pixel_counts(train_set, width, ds.ignore_index, num_workers, cache_dir=cache_dir)
        stats, seconds = stats_of(train_set, split.counts), time.perf_counter() - start
        where = f"saved to {cache_file}" if cache_file.is_file() else f"could not write the cache {cache_file}"
        origin = f"computed over {stats.num_images} masks in {seconds:.2f} s ({num_workers} workers); {where}"

    weights_cfg = OmegaConf.to_container(cfg.weights, resolve=True)
    used, table = class_weights_of(stats, weights_cfg, class_names)
    strategy = weights_cfg["strategy"]
    settings = ", ".join(f"{key}={'null' if value is None else value}"
                         for key, value in weights_cfg.items() if key != "strategy")
    values = ",".join(f"{w:.6g}" for w in used.tolist())
    kind = "multi-label channels (one sigmoid each)" if train_set.multilabel else "classes"
    return "\n".join([
        f"dataset {ds.name}: {train_set.root}, split '{train_set.split}', {len(train_set)} images, "
        f"{ds.num_classes} {kind}, ignore_index {ds.ignore_index}",
        f"class statistics {origin}",
        ignored_line(split, ds.ignore_index, train_set.multilabel),
        "",
        table,
        "",
        f"used: weights={strategy} ({settings}), after normalize and max_weight",
        "multi-label: each channel's weight is its positive-class weight (pos_weight of its sigmoid)"
        if train_set.multilabel else
        "other columns: each strategy with the options of its configs/weights/<strategy>.yaml",
        f"to freeze them: weights=manual 'weights.values=[{values}]'",
    ])


def ignored_line(split: SplitCounts | None, ignore_index: int, multilabel: bool) -> str:
    """How many of the split's pixels train nothing: their count and share of all pixels."""
    if split is None:
        return "ignored pixels: not counted (the shard index holds the class sums only)"
    ignored, pixels = int(split.ignored.sum()), int(split.pixels.sum())
    what = "ignored in every channel" if multilabel else f"ignore_index {ignore_index}"
    return f"ignored pixels ({what}): {ignored} of {pixels} ({ignored / max(pixels, 1):.2%})"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _app(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = class_stats_report(cfg)
    except (ValueError, TypeError, OSError, MissingMandatoryValue) as err:
        # These messages name the file and the value; a traceback would only bury them.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(report)


def _with_no_run_dir(argv: list[str]) -> list[str]:
    # argparse takes the overrides as one run of positional arguments, so the defaults join
    # that run (before its first item) instead of landing after a flag such as -m or --info.
    args = argv[1:]
    first = next((i for i, arg in enumerate(args) if "=" in arg or arg.startswith("~")), 0)
    return [argv[0], *args[:first], *_NO_RUN_DIR, *args[first:]]


def main() -> None:
    sys.argv = _with_no_run_dir(sys.argv)
    _app()


if __name__ == "__main__":
    main()
