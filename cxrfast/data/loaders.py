"""Batches from prepared shards: :func:`loader`, the one call for library users, and the
choice of backend the training jobs make: DALI, then plain torch on the GPU, then the CPU
DataLoader; ``--loader dali|torch|cpu`` forces one."""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from . import dali
from .gpu_torch import TorchBatchLoader
from .sampler import ResumableSampler
from .shards import PreparedData, PreparedDataset, collate

BACKENDS = ("auto", "dali", "torch", "cpu")


def choose(requested: str, device: torch.device) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"loader must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            return "dali" if dali.available() else "torch"
        return "cpu"
    if requested == "dali" and not dali.available():
        raise ModuleNotFoundError("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda120")
    return requested


def batch_factory(backend: str, data: PreparedData, *, batch_size: int, img_size: int, train: bool,
                  crop_scale: tuple[float, float], seed: int, device: torch.device, in_chans: int,
                  with_labels: bool, num_workers: int = 0) -> Callable[[ResumableSampler], Iterable] | None:
    """A function sampler -> batches for the GPU backends; None for 'cpu' (the engine's DataLoader)."""
    if backend == "cpu":
        return None
    if backend == "torch":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return lambda sampler: TorchBatchLoader(data, sampler, batch_size=batch_size, img_size=img_size, train=train,
                                                crop_scale=crop_scale, seed=seed, device=device, out_dtype=dtype,
                                                in_chans=in_chans, with_labels=with_labels)
    device_id = device.index if device.type == "cuda" else None
    half = "bf16" if device.type == "cuda" else "fp32"
    cache: dict = {}

    def make(sampler: ResumableSampler):
        if "loader" not in cache:  # one pipeline per run; each iteration follows the sampler
            cache["loader"] = dali.DALILoader(data, sampler, batch_size=batch_size, img_size=img_size, train=train,
                                              crop_scale=crop_scale, seed=seed, device_id=device_id, half=half,
                                              in_chans=in_chans, with_labels=with_labels, py_workers=num_workers)
        return cache["loader"]
    return make


class PreparedBatches:
    """The batches of a prepared folder, epoch after epoch: each ``iter()`` is the next epoch
    (new order and crops when training; :meth:`set_epoch` picks one, e.g. on resume)."""

    def __init__(self, make: Callable[[ResumableSampler], Iterable], sampler: ResumableSampler, batches: int,
                 dataset: PreparedDataset):
        self._make, self.sampler, self._batches, self.dataset = make, sampler, batches, dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._batches

    def __iter__(self) -> Iterator:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self._make(self.sampler))


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's share: the given one, else torch.distributed's, else the whole."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank,
                dist.get_world_size() if world_size is None else world_size)
    return rank or 0, world_size or 1


def loader(prepared: str | os.PathLike | PreparedData, batch_size: int = 64, *, train: bool = True,
           split: str | None = None, img_size: int | None = None, in_chans: int = 1, with_labels: bool = False,
           crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, seed: int = 0,
           device: torch.device | str = "cpu", backend: str = "auto", num_workers: int = 0,
           drop_last: bool | None = None, rank: int | None = None, world_size: int | None = None) -> PreparedBatches:
    """Batches of a folder written by ``python -m cxrfast.prepare``, in one call.

    Each batch is a float tensor (B, in_chans, img_size, img_size), normalised as in training
    ((x - 0.5) / 0.25), or ``(images, labels (B, K) float32, NaN = no label)`` with
    ``with_labels``. ``train``: shuffled, random resized crops (``crop_scale``) and flips,
    incomplete last batch dropped; else the whole images in index order, every image once.
    ``split``: "train", "val" or "test" rows of the index only (None: all). ``img_size``
    defaults to the prepared size. ``device`` "cpu" gives CPU tensors from the DataLoader
    path; a CUDA device with ``backend`` "auto" uses DALI (bf16) or else plain torch (bf16) on
    the GPU (see :func:`choose`; these always drop an incomplete last batch). Under
    torch.distributed each rank gets its own share. Iterate it once per epoch::

        batches = cxrfast.data.loader("prepared/", batch_size=64)
        for epoch in range(10):
            for images in batches:
                ...
    """
    data = prepared if isinstance(prepared, PreparedData) else PreparedData(prepared)
    if split is not None:  # a subset, not PreparedData(folder, split): that one fails on an empty split
        data = data.subset(data.where("split", split))
    if not len(data):
        raise ValueError(f"{data.folder}: no images" + (f" in split {split!r}" if split else ""))
    if with_labels and data.labels is None:
        raise ValueError(f"{data.folder}: with_labels=True, but it was prepared without labels")
    size = img_size if img_size is not None else int(data.meta["size"])
    device = torch.device(device)
    chosen = choose(backend, device)
    drop = (train if drop_last is None else drop_last) or chosen != "cpu"  # the GPU paths give full batches only
    rank, world_size = _rank_and_world(rank, world_size)
    sampler = ResumableSampler(len(data), rank=rank, world_size=world_size, seed=seed, shuffle=train)
    count = len(sampler) // batch_size if drop else -(-len(sampler) // batch_size)
    if count == 0:
        raise ValueError(f"{data.folder}: {len(sampler)} images are too few for one batch of {batch_size} "
                         "(pass drop_last=False to keep a smaller one)")
    dataset = PreparedDataset(data, img_size=size, in_chans=in_chans, train=train, crop_scale=tuple(crop_scale),
                              hflip=hflip, seed=seed, with_labels=with_labels)
    factory = batch_factory(chosen, data, batch_size=batch_size, img_size=size, train=train,
                            crop_scale=tuple(crop_scale), seed=seed, device=device, in_chans=in_chans,
                            with_labels=with_labels, num_workers=num_workers)
    if factory is None:
        def factory(s: ResumableSampler) -> DataLoader:
            return DataLoader(dataset, batch_size=batch_size, sampler=s, collate_fn=collate, num_workers=num_workers,
                              drop_last=drop)
    return PreparedBatches(factory, sampler, count, dataset)
