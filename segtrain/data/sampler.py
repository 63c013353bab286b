"""A resumable, seeded epoch sampler.

Epoch ``e`` visits a permutation drawn from ``(seed, e)`` alone, and pairs each index with a
per-draw augmentation seed from the same generator. Resuming at step ``k`` of an epoch just
skips the first ``k * batch_size`` draws, so an interrupted run continues on exactly the
batches and augmentations it would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch


class EpochSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, seed: int, drop_last_batch_of: int | None = None) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = 0
        # With drop_last, a trailing partial batch is never drawn; keep __len__ truthful.
        self._usable = num_samples - num_samples % drop_last_batch_of if drop_last_batch_of else num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the first draw to yield (a multiple of the batch size when resuming)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=gen)[: self._usable]
        seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=gen)[: self._usable]
        for index, seed in zip(order[self.start :].tolist(), seeds[self.start :].tolist()):
            yield index, seed

    def __len__(self) -> int:
        return self._usable - self.start
