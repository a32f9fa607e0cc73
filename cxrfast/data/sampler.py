"""A distributed, resumable sampler: the same order for a given (seed, epoch) on any number
of workers, sharded by rank, and able to start mid-epoch.

The order is torch.randperm's under a generator seeded by (seed, epoch), held as one int64
array (never a Python list): 10 M indices cost ~80 MB for the moment of the shuffle and
1/world_size of that afterwards. Runs started before the array rewrite see the same order,
so resuming one continues where it stopped.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

YIELD_CHUNK = 1 << 16  # indices turned into Python ints at a time while iterating


def shard_order(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of ``order``: every world_size-th element from ``rank``, after
    padding ``order`` by wrapping around to a multiple of world_size (equal counts keep
    collective ops in step; only the padding repeats an index)."""
    per_rank = -(-len(order) // world_size)
    positions = np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)
    return order[positions % len(order)]


class ResumableSampler(Sampler):
    """Yields (index, epoch) pairs: this rank's share of a seeded permutation, from ``start``.

    Every rank gets the same count (the permutation is padded by wrapping around), so
    collective ops stay in step; the dataset uses the epoch to seed augmentation.
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, this rank's indices)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        """Indices per rank and epoch (the padded share)."""
        return -(-self.size // self.world_size)

    def order(self) -> np.ndarray:
        """The whole epoch's permutation (int64), the same on every rank."""
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.size, generator=g).numpy()

    def indices(self) -> np.ndarray:
        """This rank's indices for the epoch (int64, ``per_rank`` of them), computed once per epoch."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, shard_order(self.order(), self.rank, self.world_size))
        return self._cached[1]

    def remaining(self) -> np.ndarray:
        """This epoch's indices still to come on this rank (from the resume point), int64: what
        batch loaders slice, instead of a list of (index, epoch) pairs per sample."""
        return self.indices()[self.start:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine, epoch = self.indices(), self.epoch
        for begin in range(self.start, len(mine), YIELD_CHUNK):
            for i in mine[begin:begin + YIELD_CHUNK].tolist():
                yield i, epoch

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
