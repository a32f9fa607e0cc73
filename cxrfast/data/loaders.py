"""Choosing the loader backend for prepared shards: DALI, then plain torch on the GPU, then
the CPU DataLoader; ``--loader dali|torch|cpu`` forces one."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import dali
from .gpu_torch import TorchBatchLoader
from .sampler import ResumableSampler
from .shards import PreparedData

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
