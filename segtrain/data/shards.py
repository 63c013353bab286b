"""Training and evaluation from tar shards (``dataset.layout=shards``): streamed, each sample once per epoch.

The order rules (``epoch_positions``), all functions of the seed and the epoch, the same in every process:

- Training, epoch ``e``: the shards are permuted; inside shard ``s`` the samples are visited in a permutation
  drawn with their augmentation seeds from a generator of ``(seed, e, s)``. Shard 0's generator is the one
  ``EpochSampler`` uses for the whole split, so a split written as ONE shard trains in exactly the folder
  order, with the same augmentation (``tests/test_shards.py`` checks identical weights).
- The epoch is the concatenation of those shard orders, cut to ``epoch_draws`` (a multiple of
  batch x grad_accum x ranks, as ``EpochSampler`` cuts it): a fixed number of steps every epoch. Rank ``r`` takes
  the contiguous ``r``-th of it (the folder sampler takes every ``R``-th draw instead: with several ranks the
  two orders differ), and the rank's batches go round-robin to its loader workers as the DataLoader collects
  them, each worker reading a contiguous run of batches, so that it opens its own few shards.
- A shard is read sequentially; the samples a worker needs from it are held (encoded) until the shard ends,
  then decoded in permutation order: memory is one shard's bytes per worker (``segtrain.shard`` caps shards
  at ``max_bytes``).
- Resume: ``set_epoch(e, start)`` skips the first ``start`` draws of the rank; with the same seed, ranks and
  workers the rest of the epoch is exactly what the uninterrupted run saw. The order depends on the number
  of loader workers (each reads its own run of shards): pin ``trainer.num_workers`` to reproduce a run on
  another machine.
- Evaluation: the index order, split into contiguous parts over ranks and workers, every sample exactly once.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from segtrain import distributed
from segtrain.data.folder import IMAGE_EXTENSIONS, finish_sample, read_image, size_mismatch_error
from segtrain.data.masks import MaskDecoder
from segtrain.data.shard_files import ShardError, read_samples
from segtrain.data.shard_index import DECODING_KEYS, ShardIndex, check_index_against, read_index

IMAGE_FIELDS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads shard numbers over the seed's bits


class Member(io.BytesIO):
    """One field's bytes, readable as a file, named ``<shard url>:<member>`` in every error."""

    def __init__(self, data: bytes, url: str, member: str) -> None:
        super().__init__(data)
        self.name = f"{url}:{member}"

    def __str__(self) -> str:
        return self.name


def shard_generator(seed: int, epoch: int, shard: int) -> torch.Generator:
    """Shard ``shard``'s draws in ``epoch``; shard 0's equal ``EpochSampler``'s (``seed * 1_000_003 + epoch``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) ^ ((shard * _MIX) & (2**62 - 1)))


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    if num_shards == 1:
        return [0]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + (1 << 40))
    return torch.randperm(num_shards, generator=gen).tolist()


def worker_batches(num_batches: int, workers: int, worker: int, start: int) -> tuple[int, int]:
    """(first, end) of the batches of the rank that ``worker`` makes, from batch ``start`` on.

    The rank's batches are cut into ``workers`` contiguous runs, run ``q`` as long as there are batches ``k``
    with ``k % workers == q``; the DataLoader takes one batch from each worker in turn, so batch ``k`` comes from
    run ``k % workers``. After ``start`` batches (a resume) worker 0 must make batch ``start``: worker ``w`` takes
    run ``(start + w) % workers`` from its first batch not yet made.
    """
    runs = [len(range(q, num_batches, workers)) for q in range(workers)]
    run = (start + worker) % workers
    base = sum(runs[:run])
    return base + len(range(run, start, workers)), base + runs[run]


def epoch_draws(num_samples: int, multiple: int, world_size: int) -> int:
    return num_samples - num_samples % (multiple * world_size)


def rank_positions(num_samples: int, rank: int, world_size: int, batch: int, workers: int, worker: int,
                   start: int = 0, multiple: int | None = None) -> range:
    """The epoch positions this worker of this rank yields, in order. ``multiple``: training (the epoch cut to
    a multiple of ``multiple * world_size``, ``start`` draws of the rank skipped); None: evaluation, every sample."""
    if multiple is None:
        lo, hi = num_samples * rank // world_size, num_samples * (rank + 1) // world_size
    else:
        per_rank = epoch_draws(num_samples, multiple, world_size) // world_size
        lo, hi = rank * per_rank, (rank + 1) * per_rank
    num_batches = -(-(hi - lo) // batch)
    first, end = worker_batches(num_batches, workers, worker, start // batch)
    return range(lo + first * batch, min(lo + end * batch, hi))


class ShardDataset(torch.utils.data.IterableDataset):
    """A split stored as shards (``segtrain.data.shard_index``), streamed in the order rules above.

    ``train=True``: shuffled epochs of ``epoch_draws`` samples (call ``plan`` with the loader's batch, workers
    and draws per step first); ``train=False``: every sample once, in index order. ``dataset[i]`` reads sample
    ``i`` of the index order (the hard-case galleries pick a few): its shard is read up to it and kept.
    """

    def __init__(self, root: str, split: str, num_classes: int, ignore_index: int = 255,
                 transform: Callable | None = None, *, urls: Any = None, class_names=None, train: bool = False,
                 seed: int = 0) -> None:
        self.index: ShardIndex = read_index(root, split, urls)
        check_index_against(self.index, num_classes, ignore_index, class_names)
        self.root, self.split, self.num_classes, self.ignore_index = root, split, num_classes, ignore_index
        self.transform, self.train, self.seed = transform, train, seed
        decoding = {k: v for k, v in self.index.decoding.items() if k in DECODING_KEYS and v is not None}
        self.decoder = MaskDecoder(num_classes, ignore_index, **decoding)
        self.image_paths = [name for names in self.index.names for name in names]
        self.offsets = np.cumsum([0, *self.index.sizes])
        self.batch, self.workers, self.multiple = 1, 1, 1
        self.epoch, self.start = 0, 0
        self._kept: tuple[int, dict] | None = None

    multilabel = False

    def __len__(self) -> int:
        return self.index.num_samples

    @property
    def count_columns(self) -> int:
        return self.num_classes

    def plan(self, batch: int, workers: int, multiple: int | None = None) -> int:
        """Set the loader's batch size, worker count and (training) draws per optimizer step; returns the draws
        of this rank per epoch."""
        self.batch, self.workers, self.multiple = batch, max(workers, 1), multiple or batch
        world = distributed.world_size()
        if not self.train:
            return len(rank_positions(len(self), distributed.rank(), world, batch, 1, 0))
        return epoch_draws(len(self), self.multiple, world) // world

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the draws of this rank already made (a resume), as ``EpochSampler.set_epoch``."""
        self.epoch, self.start = epoch, start

    def _positions(self, worker: int) -> range:
        return rank_positions(len(self), distributed.rank(), distributed.world_size(), self.batch, self.workers,
                              worker, self.start if self.train else 0, self.multiple if self.train else None)

    def _epoch_layout(self) -> tuple[list[int], np.ndarray]:
        """(shards in epoch order, the epoch position where each begins)."""
        order = shard_order(len(self.index.sizes), self.seed, self.epoch) if self.train else \
            list(range(len(self.index.sizes)))
        return order, np.cumsum([0, *(self.index.sizes[s] for s in order)])

    def _shard_draws(self, shard: int) -> tuple[list[int], list[int | None]]:
        """(sample at each position of the shard, its augmentation seed) this epoch."""
        size = self.index.sizes[shard]
        if not self.train:
            return list(range(size)), [None] * size
        gen = shard_generator(self.seed, self.epoch, shard)
        order = torch.randperm(size, generator=gen).tolist()  # then the seeds: EpochSampler's order of draws
        return order, torch.randint(0, 2**31 - 1, (size,), generator=gen).tolist()

    def sample_order(self) -> list[int]:
        """The index-order sample numbers of an evaluation pass, in the order the loader yields them (the
        DataLoader takes one batch from each worker in turn)."""
        runs = [list(self._positions(w)) for w in range(self.workers)]
        batches = [[run[i: i + self.batch] for i in range(0, len(run), self.batch)] for run in runs]
        return [p for turn in range(max(map(len, batches), default=0))
                for worker in batches if turn < len(worker) for p in worker[turn]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardDataset planned for {self.workers} workers, the loader has {info.num_workers}")
        positions = self._positions(worker)
        order, begins = self._epoch_layout()
        for slot, shard in enumerate(order):
            lo, hi = max(positions.start, begins[slot]), min(positions.stop, begins[slot + 1])
            if lo >= hi:
                continue
            samples, seeds = self._shard_draws(shard)
            wanted = [samples[p - begins[slot]] for p in range(lo, hi)]
            fields = self._read(shard, set(wanted))
            for p, sample in zip(range(lo, hi), wanted):
                yield self._decode(shard, sample, fields[sample], seeds[p - begins[slot]])

    def _read(self, shard: int, keep: set[int]) -> dict[int, tuple[str, dict[str, bytes]]]:
        url, size = self.index.urls[shard], self.index.sizes[shard]
        fields, count = {}, 0
        for number, key, data in read_samples(url, keep):
            count = number + 1
            if number in keep:
                fields[number] = (key, data)
        if count != size:
            # tarfile ends a stream quietly at a damaged header after the first member: the count tells
            raise ShardError(f"{url}: corrupt or truncated tar, or changed since it was indexed: {count} samples, "
                             f"its index {self.index.path} lists {size}")
        return fields

    def _decode(self, shard: int, sample: int, entry: tuple[str, dict[str, bytes]],
                seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.decode_pair(self.index.urls[shard], *entry)
        return finish_sample(self.transform, image, mask, seed)

    def decode_pair(self, url: str, key: str, fields: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, checked labels) of one sample's fields; errors name ``<url>:<member>``."""
        image_fields = [f for f in fields if f.lower() in IMAGE_FIELDS]
        mask_fields = [f for f in fields if f.startswith("mask.")]
        if len(image_fields) != 1 or len(mask_fields) != 1:
            raise ValueError(f"{url}: sample {key} has fields {sorted(fields)}; expected one image "
                             f"({', '.join(IMAGE_FIELDS)}) and one mask.<ext>")
        image_member = Member(fields[image_fields[0]], url, f"{key}.{image_fields[0]}")
        mask_member = Member(fields[mask_fields[0]], url, f"{key}.{mask_fields[0]}")
        image, mask = read_image(image_member), self.decoder(mask_member)
        if image.shape[:2] != mask.shape:
            raise size_mismatch_error(mask_member.name, mask.shape, image_member, image.shape)
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        if not 0 <= index < len(self) or shard >= len(self.index.sizes):
            raise IndexError(f"sample {index} of {len(self)}")
        if self._kept is None or self._kept[0] != shard:  # a few samples, often of one shard: keep its bytes
            self._kept = (shard, self._read(shard, set(range(self.index.sizes[shard]))))
        return self._decode(shard, index - int(self.offsets[shard]), self._kept[1][index - int(self.offsets[shard])],
                            None)

