"""A dataset that decodes image files on the fly (the direct path, no preparation needed).

Items are addressed by (index, epoch) so that augmentation is seeded by the sample and the
epoch alone: the same run gives the same crops whatever the worker count, and a resumed run
continues with exactly the crops the killed one would have used. A file that cannot be read
is logged to the errors file and replaced by the next readable one, so every rank still gets
full batches and a long run never stops for one bad file.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .files import load_image

MEAN, STD = 0.5, 0.25  # grey-level normalisation of [0, 1] display images


def crop_box(h: int, w: int, scale: tuple[float, float], g: torch.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering an area fraction in ``scale`` with
    aspect ratio in ``ratio`` (10 tries, then a centre square), drawn from ``g``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation RNG of one sample in one epoch (shared by every loader backend)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """A random crop (see :func:`crop_box`) resized to size x size, antialiased bilinear;
    (C, H, W) -> (C, size, size)."""
    top, left, ch, cw = crop_box(x.shape[1], x.shape[2], scale, g)
    crop = x[:, top:top + ch, left:left + cw]
    # Antialiasing only changes a downscale; upscaling (most crops) takes the faster kernel,
    # which gives the same values to float rounding.
    shrink = ch > size or cw > size
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=shrink, align_corners=False)[0]


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image resized to size x size (evaluation: no crop)."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class ImageDataset(Dataset):
    """(index, epoch) -> normalised (C, size, size) float tensor [, labels (K,)]."""

    def __init__(self, files: list[Path], *, img_size: int, in_chans: int = 1, train: bool = True,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5,
                 labels: np.ndarray | None = None, seed: int = 0, decode_size: int | None = None,
                 errors_path: str | os.PathLike | None = None):
        if not files:
            raise ValueError("no image files")
        self.files = list(files)
        self.img_size, self.in_chans, self.train = img_size, in_chans, train
        self.crop_scale, self.hflip = crop_scale, hflip
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.float32)
        self.seed = seed
        self.decode_size = decode_size if decode_size is not None else 2 * img_size
        self.errors_path = errors_path

    def __len__(self) -> int:
        return len(self.files)

    def _log_error(self, path: Path, exc: Exception) -> None:
        if self.errors_path is None:
            return
        line = f"{path}\t{type(exc).__name__}: {str(exc).replace(chr(10), ' ')}\n"
        fd = os.open(self.errors_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one append: lines from many workers never interleave
        finally:
            os.close(fd)

    def _read(self, index: int) -> tuple[int, np.ndarray]:
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            try:
                return i, load_image(self.files[i], self.decode_size)
            except Exception as exc:  # DicomError, OSError, PIL errors: log, use the next file
                self._log_error(self.files[i], exc)
        raise RuntimeError("no readable image file in the dataset")

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        i, img = self._read(index)
        x = torch.from_numpy(np.ascontiguousarray(img))[None]
        if self.train:
            g = sample_generator(self.seed, epoch, index)
            x = random_resized_crop(x, self.img_size, self.crop_scale, g)
            if float(torch.rand(1, generator=g)) < self.hflip:
                x = x.flip(-1)
        else:
            x = resize_square(x, self.img_size)
        x = (x - MEAN) / STD
        if self.in_chans != 1:
            x = x.expand(self.in_chans, -1, -1).contiguous()
        if self.labels is None:
            return x
        return x, self.labels[i]
