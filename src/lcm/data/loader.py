"""Endless, resumable, rank-aware batch streams over map-style or iterable datasets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

__all__ = ["batch_stream"]


class _ResumableBatchSampler(Sampler[list[int]]):
    """Global batch b of an endless stream of per-epoch permutations, sliced for this rank.

    The position is just the batch index, so resuming at batch ``start`` needs no sampler state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, start: int):
        global_batch = batch_size * world
        if n < global_batch:
            raise ValueError(f"the dataset has {n} samples, fewer than one batch of {global_batch}")
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_epoch = n // global_batch

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start
        perm, perm_epoch = None, -1
        while True:
            epoch, i = divmod(b, self.per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
                perm_epoch = epoch
            first = (i * self.world + self.rank) * self.batch_size
            yield perm[first : first + self.batch_size].tolist()
            b += 1


def batch_stream(
    dataset: Dataset | IterableDataset,
    batch_size: int,
    collate: Callable[[list[Any]], Any] | None = None,
    seed: int = 0,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
) -> Iterator[Any]:
    """Batches from micro-batch ``start`` on, forever. Map-style datasets are shuffled per epoch, deterministically;
    iterable ones (WebDataset) are re-iterated per epoch, told the epoch through ``set_epoch`` when they have it
    (so shards come in a new, seeded order each pass), and ``start`` batches are skipped on resume."""
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
        set_epoch = getattr(dataset, "set_epoch", None)
        skipped, epoch = 0, 0
        while True:
            if set_epoch is not None:
                # Before the loader's iterator is made: workers get a copy of the dataset, epoch included.
                set_epoch(epoch)
            epoch += 1
            empty = True
            for batch in loader:
                empty = False
                if skipped < start:
                    skipped += 1
                    continue
                yield batch
            if empty:
                raise ValueError("the dataset yielded no samples")
    sampler = _ResumableBatchSampler(len(dataset), batch_size, seed, rank, world, start)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
    yield from loader
