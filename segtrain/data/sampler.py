"""A resumable, seeded epoch sampler, with optional repeat factors and DDP sharding.

Epoch ``e`` visits a permutation drawn from ``(seed, e)`` alone, and pairs each index with a
per-draw augmentation seed from the same generator. Resuming at step ``k`` of an epoch just
skips the first ``k * batch_size`` draws, so an interrupted run continues on exactly the
batches and augmentations it would have seen.

With ``repeat_factors`` (``segtrain.data.repeat_factors``) image ``i`` appears ``floor(r_i)`` or
``ceil(r_i)`` times in an epoch, the extra copy with probability ``r_i - floor(r_i)``. The
extra copies are chosen by systematic sampling over a random order of the images, which
keeps that probability exact for every image while the epoch's length stays
``floor(sum r)``: every epoch has the same number of steps, as the LR schedule assumes.

Under DDP every rank draws the same epoch list (same seed) and takes every
``world_size``-th draw from its ``rank``: the shards are disjoint and equally long.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from segtrain import distributed


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given shard position, or the process group's; checked."""
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


class EpochSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, seed: int, drop_last_batch_of: int | None = None,
                 repeat_factors: Sequence[float] | torch.Tensor | None = None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.repeat_factors = None
        total = num_samples
        if repeat_factors is not None:
            factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
            if factors.shape != (num_samples,) or not torch.isfinite(factors).all() or (factors < 1).any():
                raise ValueError(f"repeat_factors must be {num_samples} finite values >= 1, got shape "
                                 f"{tuple(factors.shape)}, min {factors.min().item() if factors.numel() else None}")
            self.repeat_factors = factors
            total = int(math.floor(factors.sum().item() + 1e-9))
        # Every rank takes the same number of whole batches; a trailing partial one is never drawn.
        multiple = (drop_last_batch_of or 1) * self.world_size
        self.epoch_draws = total - total % multiple  # over all ranks
        self.draws_per_rank = self.epoch_draws // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the first draw of this rank to yield (a multiple of the batch size
        when resuming)."""
        self.epoch, self.start = epoch, start

    def _repeated_indices(self, gen: torch.Generator) -> torch.Tensor:
        """Each image floor(r) times plus once more with probability frac(r), for this epoch."""
        whole = torch.floor(self.repeat_factors)
        frac = self.repeat_factors - whole
        order = torch.randperm(self.num_samples, generator=gen)
        upper = torch.cumsum(frac[order], 0)
        lower = upper - frac[order]
        offset = torch.rand((), generator=gen, dtype=torch.float64)
        # One extra copy for each point offset + k (k = 0, 1, ...) inside an image's [lower, upper).
        extra = torch.zeros(self.num_samples, dtype=torch.long)
        extra[order] = (torch.ceil(upper - offset) - torch.ceil(lower - offset)).long()
        counts = whole.long() + extra
        return torch.repeat_interleave(torch.arange(self.num_samples), counts)

    def epoch_order(self) -> tuple[list[int], list[int]]:
        """(indices, augmentation seeds) of the whole epoch, before sharding."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.repeat_factors is None:
            order = torch.randperm(self.num_samples, generator=gen)[: self.epoch_draws]
            seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=gen)[: self.epoch_draws]
        else:
            indices = self._repeated_indices(gen)
            order = indices[torch.randperm(indices.numel(), generator=gen)][: self.epoch_draws]
            seeds = torch.randint(0, 2**31 - 1, (self.epoch_draws,), generator=gen)
        return order.tolist(), seeds.tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.epoch_order()
        mine = slice(self.rank + self.start * self.world_size, None, self.world_size)
        yield from zip(order[mine], seeds[mine])

    def __len__(self) -> int:
        return self.draws_per_rank - self.start


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...`` of a dataset, in order, for evaluation under DDP.

    Unlike ``DistributedSampler`` it never pads the shards with repeated images: every image is
    scored exactly once over all ranks, so the summed confusion matrix equals a single
    process's. Shards may differ in length by one.
    """

    def __init__(self, num_samples: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.num_samples = num_samples
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))
