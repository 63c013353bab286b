"""The class-count pass of ``segtrain.data.scan`` spread over the ranks of a DDP run.

Each rank scans every ``world_size``-th pair from its own rank on (with ``num_workers``
DataLoader workers of its own) and fills its rows of a zero (N, C + 2) int64 matrix (the class
counts, then the ignored and all pixels of the pair: ``scan.SplitCounts``); one sum all-reduce
gives every rank the whole matrix. Every row is filled by exactly one rank, so the sum is the
one-process matrix, and every pair is read once over the ranks.

The cache is the one-process pass's file (in the folder ``dataset.cache_dir`` or the read-only fallback
names: ``segtrain.data.scan_cache``, decided on rank 0). Rank 0 alone looks it up and tells the others hit
or miss: ranks that looked on their own could disagree (a file touched between two looks) and then wait in
different collectives for ever. Rank 0 alone writes it, once, after the pass.

A problem on any rank stops every rank. The all-reduce carries one flag per rank after the
counts, so every rank learns from the same collective whether some rank found one; then a
gather shares the messages, each rank that found a problem raises its own error (it names the
file) and every other rank raises one quoting the first, file included. Any exception of the
local pass is carried this way, not only the pair problems of ``scan_pair``: a rank that left
before the collective would leave the others waiting in it.

Without a process group (or with one rank) this is ``image_class_counts``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain import distributed
from segtrain.data.scan import as_int, lookup_cache, scan_counts
from segtrain.data.scan_cache import SplitCounts, write_cache

log = logging.getLogger(__name__)


def class_counts_over_ranks(source: Any, num_classes: int, ignore_index: int | None = 255, num_workers: int = 0,
                            cache: bool = True, cache_dir: str | Path | None = None) -> np.ndarray:
    """(N, C) int64: ``image_class_counts`` of the mask source, the pass shared by the ranks."""
    return pixel_counts_over_ranks(source, num_classes, ignore_index, num_workers, cache, cache_dir).counts


def pixel_counts_over_ranks(source: Any, num_classes: int, ignore_index: int | None = 255, num_workers: int = 0,
                            cache: bool = True, cache_dir: str | Path | None = None) -> SplitCounts:
    """``image_pixel_counts`` of the mask source, the pass shared by the ranks.

    A collective: every rank calls it with the same source and arguments. Raises on every rank
    when any rank met a problem.
    """
    num_classes, num_workers = as_int("num_classes", num_classes, 1), as_int("num_workers", num_workers, 0)
    path, fingerprint, cached, num_pairs = _look_up_on_rank_0(source, num_classes, ignore_index, cache, cache_dir)
    if cached is not None:
        if path is not None:  # rank 0's file
            log.info("class counts of %d masks read from %s", len(cached.counts), path)
        return cached
    rank, world = distributed.rank(), distributed.world_size()
    if distributed.is_main_process():
        log.info("reading %d masks over %d rank(s): class counts and pair checks", num_pairs, world)
    rows, problem = None, None
    try:
        if len(source.mask_paths) != num_pairs:  # the row shares would not match: nothing to scan
            raise ValueError(f"{source.root}: rank {rank} lists {len(source.mask_paths)} pairs, rank 0 lists "
                             f"{num_pairs}; the split changed while the ranks listed it")
        rows = scan_counts(source, num_classes, ignore_index, num_workers, range(rank, num_pairs, world))
    except Exception as err:  # any error: this rank must still join the collective below
        problem = err
    split = _combine(rows, problem, num_pairs, num_classes, source.root)
    if path is not None:
        write_cache(path, fingerprint, split)
    return split


def _look_up_on_rank_0(source: Any, num_classes: int, ignore_index: int | None, cache: bool,
                       cache_dir: str | Path | None) -> tuple[Path | None, str | None, SplitCounts | None, int]:
    """(cache file, fingerprint, cached matrix or None on a miss, pair count) as rank 0 sees them; the file and
    fingerprint on rank 0 only, so that only rank 0 writes."""
    path = fingerprint = reply = error = None
    if distributed.is_main_process():
        try:
            path, fingerprint, cached = lookup_cache(source, num_classes, ignore_index, cache_dir) if cache \
                else (None,) * 3
            reply = ("ok", cached, len(source.mask_paths))
        except Exception as err:  # the other ranks wait in the broadcast: tell them
            error, reply = err, ("error", f"{type(err).__name__}: {err}", 0)
    status, value, num_pairs = distributed.broadcast_object(reply)
    if status == "error":
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 stopped the class-count pass of {source.root}: {value}")
    return path, fingerprint, value, num_pairs


def _combine(rows: SplitCounts | None, problem: Exception | None, num_pairs: int, num_classes: int,
             root: Any) -> SplitCounts:
    """The counts from every rank's rows (those of rank r: r, r + world, ...), by one all-reduce whose
    last ``world`` entries flag the ranks that met a problem."""
    rank, world = distributed.rank(), distributed.world_size()
    size = num_pairs * (num_classes + 2)
    flat = torch.zeros(size + world, dtype=torch.int64)  # CPU: gloo carries it under any backend
    matrix = flat[:size].view(num_pairs, num_classes + 2)  # class counts, ignored, pixels
    if problem is None:
        matrix[rank::world] = torch.from_numpy(np.column_stack([rows.counts, rows.ignored, rows.pixels]))
    else:
        flat[size + rank] = 1
    distributed.all_reduce_sum(flat)
    flagged = flat[size:].nonzero().flatten().tolist()
    if flagged:
        _raise_everywhere(problem, flagged, root)
    whole = matrix.numpy()
    return SplitCounts(whole[:, :num_classes], whole[:, num_classes], whole[:, num_classes + 1])


def _raise_everywhere(problem: Exception | None, flagged: list[int], root: Any) -> None:
    """Every rank raises: its own problem, else the first rank's message. (A collective: all ranks reach it.)"""
    messages = distributed.all_gather_objects(None if problem is None else f"{type(problem).__name__}: {problem}")
    if problem is not None:
        raise problem
    first = flagged[0]
    others = f" (ranks {flagged} found problems)" if len(flagged) > 1 else ""
    raise RuntimeError(f"rank {first} stopped the class-count pass of {root}: {messages[first]}{others}")
