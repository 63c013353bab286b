"""The index of a sharded split: ``<root>/<split>.json``, written by ``python -m segtrain.shard``.

It lists the split's shards in order, each with its sample count, byte size, its samples' image names and
the class statistics of its masks (``ClassStats`` fields, summed over the shard's samples: every field is a
sum over images, so the split's statistics are the sum over shards). The class weights of a run come from
here: no pass over the data. It also records how the stored masks decode (label mapping, palette, the
bad-label rule), so that the shards read the same whatever the training config says about the source.

    {"format": "segtrain-shards", "version": 1, "split": "train", "num_classes": 3, "ignore_index": 255,
     "class_names": [...], "decoding": {"label_mapping": null, "palette": null, ...},
     "shards": [{"url": "train-000000.tar", "samples": 400, "bytes": 123456,
                 "names": ["images/train/0000.png", ...], "stats": {"pixel_count": [...], ...}}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segtrain.atomic import atomic_write
from segtrain.data.class_stats import ClassStats
from segtrain.data.shard_files import ShardError, expand_urls, is_local, local_path, open_url

FORMAT, VERSION = "segtrain-shards", 1
DECODING_KEYS = ("label_mapping", "palette", "on_unknown_color", "on_bad_label")


@dataclass(frozen=True)
class ShardIndex:
    path: str  # where it was read from: named by every error about it
    split: str
    num_classes: int
    ignore_index: int
    class_names: list[str] | None
    decoding: dict[str, Any]
    urls: list[str]  # where each shard is read from
    sizes: list[int]  # samples in each shard
    names: list[list[str]]  # each shard's image names, in sample order
    shard_stats: list[ClassStats]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def stats(self) -> ClassStats:
        """The split's class statistics: the shards' summed."""
        fields = ("pixel_count", "image_count", "present_pixel_count", "total_pixels", "num_images")
        zero = ClassStats.from_counts(np.zeros((0, self.num_classes), dtype=np.int64))
        totals = {f: sum((getattr(s, f) for s in self.shard_stats), getattr(zero, f)) for f in fields}
        return ClassStats(**totals)


def index_location(root: str, split: str) -> str:
    return f"{root.rstrip('/')}/{split}.json"


def write_index(path: Path, split: str, num_classes: int, ignore_index: int, class_names, decoding: dict,
                shards: list[dict]) -> None:
    payload = {"format": FORMAT, "version": VERSION, "split": split, "num_classes": num_classes,
               "ignore_index": ignore_index, "class_names": class_names, "decoding": decoding, "shards": shards}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1) + "\n"))


def _load(location: str) -> dict:
    try:
        with open_url(location) as stream:
            data = json.loads(stream.read().decode())
    except ShardError as err:
        raise ShardError(f"{err}; write the shards and their index with python -m segtrain.shard") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{location}: not a shard index ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{location}: not a shard index (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise ValueError(f"{location}: shard index version {data.get('version')!r}, this segtrain reads {VERSION}")
    return data


def _shard_urls(location: str, shards: list[dict], urls: Any) -> list[str]:
    """The index's shard names next to the index, or the URLs ``dataset.urls`` gives for the split."""
    if urls is None:
        base = location.rsplit("/", 1)[0] if "/" in location else "."
        return [f"{base}/{entry['url']}" for entry in shards]
    expanded = expand_urls(urls)
    if len(expanded) != len(shards):
        raise ValueError(f"dataset.urls: {urls!r} names {len(expanded)} shards, the index {location} lists "
                         f"{len(shards)}; the URLs must name the index's shards in its order")
    return expanded


def read_index(root: str, split: str, urls: Any = None) -> ShardIndex:
    """The index of ``split`` under ``root`` (a directory or URL prefix), checked."""
    location = index_location(str(root), split)
    if is_local(location):
        location = str(local_path(location))
    data = _load(location)
    try:
        shards = data["shards"]
        for entry in shards:
            if len(entry["names"]) != entry["samples"]:
                raise ValueError(f"shard {entry['url']}: {entry['samples']} samples but {len(entry['names'])} names")
        stats = [ClassStats(**entry["stats"]) for entry in shards]
        index = ShardIndex(location, data["split"], int(data["num_classes"]), int(data["ignore_index"]),
                           data.get("class_names"), dict(data.get("decoding") or {}),
                           _shard_urls(location, shards, urls), [int(e["samples"]) for e in shards],
                           [list(e["names"]) for e in shards], stats)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{location}: a shard index without a valid {err} entry") from None
    if not index.num_samples:
        raise ValueError(f"{location}: the index lists no samples")
    return index


def check_index_against(index: ShardIndex, num_classes: int, ignore_index: int, class_names) -> None:
    """The run's dataset settings must be the ones the shards were written with."""
    for key, ours, theirs in (("num_classes", num_classes, index.num_classes),
                              ("ignore_index", ignore_index, index.ignore_index),
                              ("class_names", class_names, index.class_names)):
        if theirs is not None and ours is not None and list(np.atleast_1d(ours)) != list(np.atleast_1d(theirs)):
            raise ValueError(f"dataset.{key}={ours!r}, but the shards of {index.path} were written with "
                             f"{key}={theirs!r}: set dataset.{key} to match")
