"""A dataset that decodes image files on the fly (the direct path, no preparation needed).

Items are addressed by (index, epoch) so that augmentation is seeded by the sample and the
epoch alone: the same run gives the same crops whatever the worker count, and a resumed run
continues with exactly the crops the killed one would have used. A file that cannot be read
is logged to the errors file (``errors.csv``, see cxrfast.errorfile; once per file and run
folder, however many epochs, reruns and resumes meet it) and replaced by the next readable one (with that one's labels),
so every rank still gets full batches and a long run never stops for one bad file. For
evaluation (``substitute=False``) a bad file raises :class:`UnreadableImage` instead, so
the caller drops the image and its labels rather than scoring another file under them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import errorfile
from .augment import MEAN, STD, crop_resize, draw_crops, whole_images
from .files import load_image


class UnreadableImage(Exception):
    """An image file that could not be decoded (``substitute=False``); carries its index."""

    def __init__(self, index: int, path: Path, cause: Exception):
        super().__init__(f"{path}: {type(cause).__name__}: {' '.join(str(cause).split())}")
        self.index, self.path = index, path
        _, self.error, self.reason = errorfile.row(path, cause)  # the errors file's columns


class ImageDataset(Dataset):
    """(index, epoch) -> normalised (C, size, size) float tensor [, labels (K,)]."""

    def __init__(self, files: list[Path], *, img_size: int, in_chans: int = 1, train: bool = True,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5,
                 labels: np.ndarray | None = None, seed: int = 0, decode_size: int | None = None,
                 errors_path: str | os.PathLike | None = None, substitute: bool = True):
        if not files:
            raise ValueError("no image files")
        self.files = list(files)
        self.img_size, self.in_chans, self.train = img_size, in_chans, train
        self.crop_scale, self.hflip = crop_scale, hflip
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.float32)
        self.seed = seed
        self.decode_size = decode_size if decode_size is not None else 2 * img_size
        self.errors_path = errors_path
        self.substitute = substitute
        self._logged: set[str] = set()  # paths in the errors file; filled from it on the first error

    def __len__(self) -> int:
        return len(self.files)

    def _log_error(self, path: Path, exc: Exception) -> None:
        """Adds ``path`` to the errors file (cxrfast.errorfile) unless it is listed there
        already, so every epoch, rerun and resume into the same run folder lists each bad file once."""
        if self.errors_path is not None:
            errorfile.append_once(self.errors_path, errorfile.row(path, exc), self._logged)

    def _read(self, index: int) -> tuple[int, np.ndarray]:
        if not self.substitute:
            try:
                return index, load_image(self.files[index], self.decode_size)
            except Exception as exc:  # DicomError, OSError, PIL errors: the caller drops this item
                raise UnreadableImage(index, self.files[index], exc) from exc
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
        img = np.ascontiguousarray(img, dtype=np.float32)
        h, w = img.shape
        if self.train:
            boxes, mirror = draw_crops(h, w, [index], seed=self.seed, epochs=epoch, scale=self.crop_scale,
                                       hflip=self.hflip)
        else:
            boxes, mirror = whole_images(h, w, 1)
        x = crop_resize([img], boxes, mirror, self.img_size, value_scale=1.0, mean=MEAN, std=STD, threads=1)[0]
        if self.in_chans != 1:
            x = x.expand(self.in_chans, -1, -1).contiguous()
        if self.labels is None:
            return x
        return x, self.labels[i]
