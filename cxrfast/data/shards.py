"""Reading a prepared folder (see cxrfast.prepare): memory-mapped shards plus the index."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .augment import MEAN, STD, OutputPool, crop_resize, draw_crops, whole_images

FORMAT_VERSION = 2  # 2: per-shard manifests and recorded settings (parts/); 1 could mix shards of two sizes


class PreparedFormatError(ValueError):
    """A prepared folder this cxrfast cannot read as it is (other format version, inconsistent shards)."""


def is_prepared(folder: str | os.PathLike | None) -> bool:
    return folder is not None and (Path(folder) / "meta.json").is_file() and (Path(folder) / "index.csv").is_file()


class PreparedData:
    """Shards (np.load mmap) and index rows, optionally one split; ``image(i)`` is a zero-copy view."""

    def __init__(self, folder: str | os.PathLike, split: str | None = None):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        version = self.meta.get("format_version") if isinstance(self.meta, dict) else None
        if version != FORMAT_VERSION:
            raise PreparedFormatError(
                f"{self.folder}: prepared format_version {version!r}, this cxrfast reads {FORMAT_VERSION}; "
                f"rebuild it with `python -m cxrfast.prepare SRC {self.folder} --overwrite`")
        self.shards = [self._open_shard(name) for name in self.meta["shards"]]
        with open(self.folder / "index.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if split is not None:
            rows = [r for r in rows if r["split"] == split]
        self.rows = rows
        self.label_names: list[str] = list(self.meta.get("label_names", []))
        self.locations = np.array([(int(r["shard"]), int(r["offset"])) for r in rows], np.int64).reshape(-1, 2)
        self._check_locations()
        if self.label_names:
            self.labels = np.array([[float(r[f"label_{n}"]) if r[f"label_{n}"] != "" else np.nan
                                     for n in self.label_names] for r in rows], np.float32).reshape(len(rows), -1)
        else:
            self.labels = None
        self.patients = [r["patient_id"] or r["source"] for r in rows]
        self._index_views()

    def _open_shard(self, name: str) -> np.ndarray:
        """A shard as a memmap, refused unless it has the size and dtype meta.json promises."""
        path = self.folder / name
        array = np.load(path, mmap_mode="r")
        size, dtype = self.meta["size"], np.dtype(self.meta["dtype"])
        if array.ndim != 3 or array.shape[1:] != (size, size) or array.dtype != dtype:
            raise PreparedFormatError(f"{path}: {array.dtype} {array.shape}, but meta.json says "
                                      f"{dtype} (N, {size}, {size})")
        return array

    def _check_locations(self) -> None:
        """Every index row must point inside its shard (a clear error instead of an IndexError mid-epoch)."""
        lengths = np.array([len(s) for s in self.shards] + [0], np.int64)
        shard, offset = self.locations[:, 0], self.locations[:, 1]
        bad = np.flatnonzero((shard < 0) | (shard >= len(self.shards)) | (offset < 0) |
                             (offset >= lengths[np.clip(shard, -1, len(self.shards))]))
        if len(bad):
            r = self.rows[bad[0]]
            raise PreparedFormatError(f"{self.folder / 'index.csv'}: the row of {r['source']} points at shard "
                                      f"{r['shard']} offset {r['offset']}, which does not exist")

    def _index_views(self) -> None:
        """Plain ndarray views of the memmaps and (shard, offset) as Python ints: image(i) is
        then 0.15 us instead of 4 us (np.memmap indexing), which showed at 20k images/s."""
        self._arrays = [np.asarray(s) for s in self.shards]
        self._where = self.locations.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> "PreparedData":
        """A view of some rows (shards shared, not reopened)."""
        view = object.__new__(PreparedData)
        view.folder, view.meta, view.shards, view.label_names = self.folder, self.meta, self.shards, self.label_names
        view.rows = [self.rows[i] for i in indices]
        view.locations = self.locations[list(indices)].reshape(-1, 2)
        view.labels = None if self.labels is None else self.labels[list(indices)]
        view.patients = [self.patients[i] for i in indices]
        view._index_views()
        return view

    @property
    def scale(self) -> float:
        return float(np.iinfo(self.dtype).max)

    def image(self, i: int) -> np.ndarray:
        shard, offset = self._where[i]
        return self._arrays[shard][offset]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def batch(self, indices: list[int], out: np.ndarray | None = None) -> np.ndarray:
        """Gathers images (B, size, size) in the stored dtype, into ``out`` when given (e.g. a
        view of pinned memory, saving a copy)."""
        if out is None:
            out = np.empty((len(indices), self.meta["size"], self.meta["size"]), self.dtype)
        for k, i in enumerate(indices):
            out[k] = self.image(i)
        return out


COLLATE_HINT = ("PreparedDataset fetches whole batches: pass collate_fn=cxrfast.data.shards.collate to the "
                "DataLoader, e.g. DataLoader(dataset, batch_size=64, collate_fn=collate), or let "
                "cxrfast.data.loader(prepared_folder, batch_size=64) build the loader")


class FetchedBatch:
    """A batch a dataset built whole in ``__getitems__``; :func:`collate` passes it through.

    torch's default collate starts by indexing the batch it is given: here that says which
    collate function to pass instead of failing somewhere inside torch."""

    def __init__(self, value):
        self.value = value

    def __getitem__(self, index):
        raise TypeError(COLLATE_HINT)


def collate(samples):
    """The DataLoader collate function for every cxrfast dataset: batches fetched whole
    (PreparedDataset) go through untouched, lists of samples are stacked as usual."""
    if isinstance(samples, FetchedBatch):
        return samples.value
    return default_collate(samples)


class PreparedDataset(Dataset):
    """The CPU path over a prepared folder: (index, epoch) -> normalised (C, size, size) [, labels].

    ``cxrfast.data.loader(folder, batch_size=...)`` builds the batches in one call. A
    DataLoader of your own needs ``collate_fn=collate`` (without it, the first batch raises a
    TypeError saying so): it fetches whole batches through
    ``__getitems__``: crops are drawn for the batch at once and cropped, resized, mirrored and
    normalised straight from the memmap by native code into one output tensor (reused once
    nothing holds it; in shared memory in a worker). Crops and flips are those of every other
    torch-side path (see cxrfast.data.augment), so a run gives the same augmentation whichever
    path feeds it.
    """

    in_process = True  # best read by native threads in the training process, not worker processes

    def __init__(self, data: PreparedData, *, img_size: int, in_chans: int = 1, train: bool = True,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, seed: int = 0,
                 with_labels: bool = False):
        self.data, self.img_size, self.in_chans, self.train = data, img_size, in_chans, train
        self.crop_scale, self.hflip, self.seed = crop_scale, hflip, seed
        self.with_labels = with_labels and data.labels is not None
        self.outputs = OutputPool()

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, keys: list) -> FetchedBatch:
        keys = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        indices = [i for i, _ in keys]
        images = [self.data.image(i) for i in indices]
        size = self.data.meta["size"]
        if self.train:
            boxes, mirror = draw_crops(size, size, indices, seed=self.seed, epochs=[e for _, e in keys],
                                       scale=self.crop_scale, hflip=self.hflip)
        else:
            boxes, mirror = whole_images(size, size, len(keys))
        out = self.outputs.get((len(keys), 1, self.img_size, self.img_size))
        x = crop_resize(images, boxes, mirror, self.img_size, value_scale=self.data.scale, mean=MEAN, std=STD, out=out)
        if self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1).contiguous()
        if self.with_labels:
            return FetchedBatch((x, torch.from_numpy(self.data.labels[indices])))
        return FetchedBatch(x)

    def __getitem__(self, key):
        batch = self.__getitems__([key]).value
        if self.with_labels:
            return batch[0][0], batch[1][0]
        return batch[0]
