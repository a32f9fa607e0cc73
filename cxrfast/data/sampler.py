"""A distributed, resumable sampler: the same order for a given (seed, epoch) on any number
of workers, sharded by rank, and able to start mid-epoch."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Yields (index, epoch) pairs: this rank's share of a seeded permutation, from ``start``.

    Every rank gets the same count (the permutation is padded by wrapping around), so
    collective ops stay in step; the dataset uses the epoch to seed augmentation.
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = -(-self.size // self.world_size)
        order = (order * (per_rank * self.world_size // self.size + 1))[: per_rank * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.indices()[self.start:]:
            yield i, self.epoch

    def __len__(self) -> int:
        return len(self.indices()) - self.start
