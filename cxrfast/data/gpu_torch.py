"""The plain-torch GPU path: batches from the memmap into pinned memory, then crop, flip and
normalise on CUDA tensors (for GPU machines without DALI).

Crop boxes and flips are drawn exactly as the CPU path draws them (cxrfast.data.augment),
then applied to the whole batch at once with one affine grid_sample (bilinear,
no antialias: crops are mostly upsampled to the training size). Runs on CPU tensors too,
which is how the tests check it without a GPU.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .augment import MEAN, STD, draw_crops
from .sampler import ResumableSampler
from .shards import PreparedData


class TorchBatchLoader:
    def __init__(self, data: PreparedData, sampler: ResumableSampler, *, batch_size: int, img_size: int,
                 train: bool = True, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, seed: int = 0,
                 device: torch.device | str = "cuda", out_dtype: torch.dtype = torch.bfloat16, in_chans: int = 1,
                 with_labels: bool = False, prefetch: int = 2):
        self.data, self.sampler, self.batch_size, self.img_size = data, sampler, batch_size, img_size
        self.train, self.crop_scale, self.hflip, self.seed = train, crop_scale, hflip, seed
        self.device, self.out_dtype, self.in_chans = torch.device(device), out_dtype, in_chans
        self.with_labels = with_labels and data.labels is not None
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _host_batches(self) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        keys = list(self.sampler)
        pin = self.device.type == "cuda"
        size = self.data.meta["size"]
        dtype = torch.from_numpy(np.empty(0, self.data.dtype)).dtype
        for start in range(0, len(keys) - self.batch_size + 1, self.batch_size):
            chunk = keys[start:start + self.batch_size]
            # gathered straight into pinned memory (torch's caching host allocator: cheap after
            # the first batches, and a block is not reused while a copy from it is in flight)
            host = torch.empty((len(chunk), size, size), dtype=dtype, pin_memory=pin)
            self.data.batch([i for i, _ in chunk], out=host.numpy())
            yield chunk, host

    def _prefetched(self):
        """Gathers the next batches from the memmap in a thread while the GPU works; the
        thread ends with the epoch, or as soon as the consumer stops early (max_steps)."""
        q: queue.Queue = queue.Queue(self.prefetch)
        done, stop = object(), threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            for item in self._host_batches():
                if not put(item):
                    return
            put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not done:
                yield item
        finally:
            stop.set()
            thread.join()

    def transform(self, chunk: list[tuple[int, int]], host: torch.Tensor) -> torch.Tensor:
        x = host.to(self.device, non_blocking=True)[:, None].float() / self.data.scale
        b, _, h, w = x.shape
        if self.train:
            boxes, mirror = draw_crops(h, w, [i for i, _ in chunk], seed=self.seed, epochs=[e for _, e in chunk],
                                       scale=self.crop_scale, hflip=self.hflip)
            top, left, ch, cw = (torch.from_numpy(boxes[:, k]).double() for k in range(4))
            theta = torch.zeros(b, 2, 3, dtype=torch.float64)
            theta[:, 0, 0] = torch.where(torch.from_numpy(mirror), -cw, cw) / w
            theta[:, 0, 2] = (2 * left + cw) / w - 1
            theta[:, 1, 1] = ch / h
            theta[:, 1, 2] = (2 * top + ch) / h - 1
            theta = theta.float()
            grid = F.affine_grid(theta.to(self.device), [b, 1, self.img_size, self.img_size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif h != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - MEAN) / STD).to(self.out_dtype)
        if self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        return x

    def __iter__(self):
        for chunk, host in self._prefetched():
            x = self.transform(chunk, host)
            if self.with_labels:
                labels = np.stack([self.data.labels[i] for i, _ in chunk])
                yield x, torch.from_numpy(labels).to(self.device, non_blocking=True)
            else:
                yield x
