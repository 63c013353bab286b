"""``python -m segtrain.shard dataset=<any> out=<dir> [splits=[train,val]] [max_count=1000] [max_bytes=268435456]``

Writes each split of a dataset as WebDataset-format tar shards, ``<out>/<split>-000000.tar`` ..., and the
split's index ``<out>/<split>.json`` (``segtrain.data.shard_index``). A sample is three members: the image
file's bytes as stored (``<key>.png``/``.jpg``/...), the mask file's bytes as stored (``<key>.mask.png``: a
palette or 16-bit mask stays bit-exact) and ``<key>.json`` (the source names and the mask's class counts).
The pairs are read in the dataset's order through the one checked pass of training (a bad pair stops here,
naming its file, before a shard is written); a shard is written under a temporary name and renamed when
complete, the index last.

    python -m segtrain.shard dataset=synthetic out=data/shards/synthetic
    python -m segtrain dataset=shards dataset.root=data/shards/synthetic

Multi-label datasets (``dataset.regions``, ``layout=binary_masks``) are not written as shards.
Exit status 0 when written, 2 on an error (printed without a traceback).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.build import dataset_split, split_counts
from segtrain.config import compose_config, split_overrides
from segtrain.config.checks import class_names_of, is_multilabel
from segtrain.data.class_stats import ClassStats
from segtrain.data.shard_files import ShardWriter
from segtrain.data.shard_index import write_index

log = logging.getLogger("segtrain.shard")
KEYS = ("out", "splits", "max_count", "max_bytes")
USAGE = "usage: python -m segtrain.shard dataset=<name> out=<dir> [splits=[train,val]] [max_count=N] [max_bytes=N]"


def shard_split(dataset, out: Path, max_count: int, max_bytes: int) -> dict:
    """Write one split's shards and index; returns the index entries' totals for the summary."""
    counts = split_counts(dataset)  # every pair checked, before any shard
    writer = ShardWriter(out, dataset.split, max_count, max_bytes)
    rows: list[list[int]] = []  # the dataset rows of each shard
    for i, (image_path, mask_path) in enumerate(zip(dataset.image_paths, dataset.mask_paths)):
        image_path, mask_path = Path(image_path), Path(mask_path)
        fields = {image_path.suffix.lower().lstrip("."): image_path.read_bytes(),
                  "mask" + mask_path.suffix.lower(): mask_path.read_bytes(),
                  "json": json.dumps({"image": _name(image_path, dataset.root), "mask": _name(mask_path, dataset.root),
                                      "counts": counts[i].tolist()}).encode()}
        before = len(writer.shards)
        writer.write(f"{i:08d}", fields)
        if not rows or len(writer.shards) != before:
            rows.append([])
        rows[-1].append(i)
    shards = writer.finish()
    for entry, members in zip(shards, rows):
        entry["names"] = [_name(Path(dataset.image_paths[i]), dataset.root) for i in members]
        entry["stats"] = ClassStats.from_counts(counts[members]).to_dict()
    return {"shards": shards, "samples": len(counts)}


def _name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def write_shards(cfg, out: Path, splits: list[str], max_count: int, max_bytes: int) -> list[str]:
    """Every split of ``cfg.dataset`` in ``splits`` as shards under ``out``; the summary lines."""
    ds = cfg.dataset
    if is_multilabel(ds):
        raise ValueError(f"dataset {ds.name}: a multi-label dataset (dataset.regions or layout=binary_masks) cannot be "
                         "written as shards yet; shards hold one label-map mask per image")
    if ds.layout == "shards":
        raise ValueError("dataset.layout=shards: the data is already sharded; name the dataset it came from")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for split in splits:
        dataset = dataset_split(ds, split)
        written = shard_split(dataset, out, max_count, max_bytes)
        palette = _plain(ds.get("palette"))  # a palette's decoder holds it as colours -> classes: keep the source form
        decoding = {"label_mapping": None if palette is not None else dataset.decoder.label_mapping,
                    "palette": palette, "on_unknown_color": ds.get("on_unknown_color") or "error",
                    "on_bad_label": dataset.decoder.on_bad_label}
        write_index(out / f"{split}.json", split, ds.num_classes, ds.ignore_index, class_names_of(ds), decoding,
                    written["shards"])
        lines.append(f"{split}: {written['samples']} samples in {len(written['shards'])} shards "
                     f"({sum(s['bytes'] for s in written['shards']) / 2**20:.1f} MiB), index {out / f'{split}.json'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        own, others = split_overrides(argv, KEYS)
        options = OmegaConf.from_dotlist(own)
        if options.get("out") is None:
            print(f"{USAGE}\nmissing: out", file=sys.stderr)
            return 2
        cfg = compose_config(others)
        splits = list(options.get("splits") or dict.fromkeys([cfg.dataset.train_split, cfg.dataset.val_split]))
        max_count, max_bytes = int(options.get("max_count", 1000)), int(options.get("max_bytes", 256 * 2**20))
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"max_count={max_count} and max_bytes={max_bytes} must be >= 1")
        lines = write_shards(cfg, Path(str(options.out)).expanduser(), splits, max_count, max_bytes)
    except (ValueError, TypeError, OSError, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
