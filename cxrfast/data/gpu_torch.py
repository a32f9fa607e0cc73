"""The plain-torch GPU path: batches from the memmap into pinned memory, then crop, flip and
normalise on CUDA tensors (for GPU machines without DALI).

Crop boxes and flips are drawn exactly as the CPU path draws them (cxrfast.data.augment),
then applied to the whole batch at once as two batched matmuls with per-image resampling
matrices (the CPU path's antialiased triangle filter, crop and mirror folded in): the same
numbers as the CPU path to float rounding, at ~15 GFLOP per 256-image batch. Runs on CPU
tensors too, which is how the tests check it without a GPU.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from .augment import draw_crops, normalisation, triangle_matrices, whole_images
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
        mine, epoch = self.sampler.remaining(), self.sampler.epoch
        pin = self.device.type == "cuda"
        size = self.data.meta["size"]
        dtype = torch.from_numpy(np.empty(0, self.data.dtype)).dtype
        for start in range(0, len(mine) - self.batch_size + 1, self.batch_size):
            chunk = [(i, epoch) for i in mine[start:start + self.batch_size].tolist()]
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
        x = host.to(self.device, non_blocking=True).float()  # (B, H, W) stored values
        b, h, w = x.shape
        if self.train:
            boxes, mirror = draw_crops(h, w, [i for i, _ in chunk], seed=self.seed, epochs=[e for _, e in chunk],
                                       scale=self.crop_scale, hflip=self.hflip)
        else:
            boxes, mirror = whole_images(h, w, b)
        size = self.img_size
        wy = triangle_matrices(boxes[:, 0], boxes[:, 2], size, h, device=self.device)
        wx = triangle_matrices(boxes[:, 1], boxes[:, 3], size, w, mirror, device=self.device)
        x = torch.bmm(torch.bmm(wy, x), wx.transpose(1, 2))  # crop, antialiased resize, flip
        gain, offset = normalisation(self.data.scale)
        x = (x * gain + offset).to(self.out_dtype)[:, None]
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
