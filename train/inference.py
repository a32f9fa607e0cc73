"""Batched inference for validation and evaluation: class scores and pooled encoder features.

Every score stays tied to the dataset index of the image it came from. An image that cannot
be read is dropped with its index (and so its labels), never replaced by another file. Under
DDP each rank scores its own share of the indices and the shares are gathered, so every
rank ends with the same predictions, in dataset order, each index once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from cxrfast import errorfile
from cxrfast.data.direct import UnreadableImage
from cxrfast.data.shards import FetchedBatch, collate

from . import runtime


@dataclass
class Predictions:
    """Scores (N, K) or features (N, D) of the images read, their dataset indices (N,), and
    (index, path, error class, reason) of each image that could not be read; ``total`` images were asked for."""

    indices: np.ndarray
    values: np.ndarray
    total: int
    failed: list[tuple[int, str, str, str]] = field(default_factory=list)

    @property
    def unreadable(self) -> int:
        return len(self.failed)


class _Indexed(Dataset):
    """Some indices of a dataset -> whole batches of (images read, their indices, failures)."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> FetchedBatch:
        wanted = [self.indices[p] for p in positions]
        if hasattr(self.base, "__getitems__"):  # prepared shards: decoded already, read as one batch
            batch = self.base.__getitems__(wanted)
            x = batch.value if isinstance(batch, FetchedBatch) else batch
            x = x[0] if isinstance(x, (list, tuple)) else x
            return FetchedBatch((x, torch.tensor(wanted, dtype=torch.int64), []))
        images, good, failed = [], [], []
        for i in wanted:
            try:
                item = self.base[i]
            except UnreadableImage as exc:
                failed.append((i, str(exc.path), exc.error, exc.reason))
                continue
            images.append(item[0] if isinstance(item, (list, tuple)) else item)
            good.append(i)
        x = torch.stack(images) if images else torch.zeros(0)
        return FetchedBatch((x, torch.tensor(good, dtype=torch.int64), failed))


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's indices of range(n): every index on exactly one rank (no padding)."""
    return list(range(rank, n, world_size))


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 64,
            features: bool = False, num_workers: int = 0) -> Predictions:
    """Sigmoid scores, or pooled features with ``features``, of every readable image, in
    dataset order; under DDP every rank must call it (it gathers across ranks)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    part = _Indexed(dataset, shard(len(dataset), rank, world))
    was_training = model.training
    model.eval()
    values, indices, failed = [], [], []
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    for x, idx, bad in loader:
        failed.extend(bad)
        if not len(idx):
            continue
        with runtime.autocast(device):
            y = model.forward_features(x.to(device)) if features else torch.sigmoid(model(x.to(device)))
        values.append(y.float().cpu())
        indices.append(idx)
    model.train(was_training)
    mine = (torch.cat(indices).numpy() if indices else np.zeros(0, np.int64),
            torch.cat(values).numpy() if values else None, failed)
    parts = [mine]
    if distributed:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    return _merge(parts, len(dataset))


def _merge(parts: list, total: int) -> Predictions:
    """One Predictions from the ranks' shares: sorted by index, each index once."""
    idx = np.concatenate([p[0] for p in parts]).astype(np.int64)
    blocks = [p[1] for p in parts if p[1] is not None]
    if not blocks:
        return Predictions(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), total,
                           sorted({f[0]: f for p in parts for f in p[2]}.values()))
    vals = np.concatenate(blocks)
    idx, first = np.unique(idx, return_index=True)  # sorted; a repeated index is kept once
    failed = sorted({f[0]: f for p in parts for f in p[2]}.values())
    return Predictions(idx, vals[first], total, failed)


def write_errors(path, failed: list[tuple[int, str, str, str]]) -> None:
    """The unreadable images in the errors-file layout (source, error, reason; see
    cxrfast.errorfile), written whole and atomically each time, so a rerun replaces the file."""
    errorfile.write(path, (f[1:] for f in failed))
