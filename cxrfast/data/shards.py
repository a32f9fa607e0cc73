"""Reading a prepared folder (see cxrfast.prepare): memory-mapped shards plus the index.

The index is read column by column from ``index/`` (see cxrfast.data.index), memory-mapped:
a training job touches shard, offset (and split, labels when it uses them); sources and
patient ids are decoded only for the rows asked. A folder without ``index/`` (written by an
older cxrfast, or by hand) is read from index.csv into the same columns.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from . import index as columnar
from .augment import MEAN, STD, OutputPool, crop_resize, draw_crops, whole_images
from .index import FORMAT_VERSION, PreparedFormatError, Text

# (index/ beside index.csv needs no new version: readers without it read the CSV, this one reads either)
LARGE_CSV = 200_000  # rows from which reading index.csv as text says how to avoid it
CHECK_CHUNK = 1 << 20  # rows per step of the location check: bounded temporary memory at 10 M rows

__all__ = ["FORMAT_VERSION", "PreparedData", "PreparedDataset", "PreparedFormatError", "collate", "is_prepared"]


def is_prepared(folder: str | os.PathLike | None) -> bool:
    return folder is not None and (Path(folder) / "meta.json").is_file() and (Path(folder) / "index.csv").is_file()


def _read_meta(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise PreparedFormatError(
            f"{folder}: prepared format_version {version!r}, this cxrfast reads {FORMAT_VERSION}; "
            f"rebuild it with `python -m cxrfast.prepare SRC {folder} --overwrite`")
    return meta


def _open_table(folder: Path, meta: dict) -> columnar.Table:
    """The columnar index when meta.json lists one that matches index.csv, else index.csv itself."""
    names = list(meta.get("label_names", []))
    spec, csv_path = meta.get("index"), folder / "index.csv"
    if spec is not None and csv_path.is_file() and csv_path.stat().st_size != spec.get("csv_bytes"):
        warnings.warn(f"{csv_path} changed after {folder / columnar.INDEX_DIR} was written: reading the CSV; "
                      f"rerun `python -m cxrfast.prepare SRC {folder}` to rewrite the columnar index", stacklevel=3)
        spec = None
    if spec is not None:
        return columnar.load(folder, spec, names)
    t0 = time.perf_counter()
    table = columnar.read_csv(csv_path, names)
    if table.rows >= LARGE_CSV:
        warnings.warn(f"{csv_path}: {table.rows} rows read as text in {time.perf_counter() - t0:.1f} s by every "
                      f"process; rerun `python -m cxrfast.prepare SRC {folder}` (nothing is decoded again) to add "
                      f"the memory-mapped {columnar.INDEX_DIR}/", stacklevel=3)
    for name in ("shard", "offset"):
        if name not in table.columns:
            raise PreparedFormatError(f"{csv_path}: no {name!r} column")
    return table


class PreparedData:
    """Shards (np.load mmap) and the index, optionally one split; ``image(i)`` is a zero-copy view.

    A view of rows of the index: ``column(name)``, ``where(name, value)``, ``sources()``,
    ``patient_ids()`` and ``labels`` (float32 (N, K), NaN = ignore) give this view's rows only;
    ``subset`` makes a smaller view without copying any text column."""

    def __init__(self, folder: str | os.PathLike, split: str | None = None):
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder)
        self.shards = [self._open_shard(name) for name in self.meta["shards"]]
        self.table = _open_table(self.folder, self.meta)
        self.label_names: list[str] = list(self.meta.get("label_names", []))
        self._rows: np.ndarray | None = None  # positions in the table; None: all, in order
        self._shard, self._offset = self.table.columns["shard"], self.table.columns["offset"]
        self._arrays = [np.asarray(s) for s in self.shards]  # plain views: indexing np.memmap costs 4 us
        self._check_locations()
        if split is not None:
            view = self.subset(self.where("split", split))
            self._rows, self._shard, self._offset = view._rows, view._shard, view._offset

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
        for start in range(0, len(self._shard), CHECK_CHUNK):
            shard = self._shard[start:start + CHECK_CHUNK].astype(np.int64)
            offset = self._offset[start:start + CHECK_CHUNK]
            bad = np.flatnonzero((shard < 0) | (shard >= len(self.shards)) | (offset < 0) |
                                 (offset >= lengths[np.clip(shard, -1, len(self.shards))]))
            if len(bad):
                k = start + int(bad[0])
                raise PreparedFormatError(f"{self.folder / 'index.csv'}: the row of {self.sources([k])[0]} points at "
                                          f"shard {self._shard[k]} offset {self._offset[k]}, which does not exist")

    def __len__(self) -> int:
        return len(self._shard)

    @property
    def table_rows(self) -> np.ndarray | None:
        """This view's positions in the index (None: the whole index, in order): with the folder,
        all a worker process needs to open the same view itself (``PreparedData.reopen``)."""
        return self._rows

    @classmethod
    def reopen(cls, folder: str | os.PathLike, table_rows: np.ndarray | None) -> "PreparedData":
        """The view a ``(folder, table_rows)`` pair names, opened afresh (memory maps, not copies)."""
        data = cls(folder)
        return data if table_rows is None else data.subset(table_rows)

    def _positions(self, indices=None) -> np.ndarray | None:
        """Table positions of this view's ``indices`` (all its rows when None; None: the whole table)."""
        if indices is None:
            return self._rows
        indices = np.asarray(indices, np.int64).reshape(-1)
        return indices if self._rows is None else self._rows[indices]

    def subset(self, indices) -> "PreparedData":
        """A view of some rows (shards and columns shared, not reopened or copied)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        view = object.__new__(PreparedData)
        view.folder, view.meta, view.shards, view.table = self.folder, self.meta, self.shards, self.table
        view.label_names, view._arrays = self.label_names, self._arrays
        view._rows = self._positions(indices)
        view._shard, view._offset = self._shard[indices], self._offset[indices]
        return view

    def column(self, name: str, indices=None) -> np.ndarray | list[str]:
        """One index column over this view (or its ``indices``): numbers as an array (-1 / NaN
        where the CSV is empty), split and view as an array of str, text as a list of str."""
        if name not in self.table.columns:
            raise KeyError(f"{self.folder}: the index has no column {name!r} (it has {', '.join(self.table.columns)})")
        column, rows = self.table.columns[name], self._positions(indices)
        if isinstance(column, (Text, columnar.Category)):
            return column.take(rows)
        return column if rows is None else column[rows]

    def where(self, name: str, value) -> np.ndarray:
        """Positions (int64) of this view's rows whose ``name`` is ``value``, e.g. where("split", "train")."""
        column, rows = self.table.columns.get(name), self._rows
        if isinstance(column, columnar.Category):
            codes = column.codes if rows is None else column.codes[rows]
            return np.flatnonzero(codes == column.code(value))
        return np.flatnonzero(np.asarray(self.column(name)) == value)

    def sources(self, indices=None) -> list[str]:
        """The source paths (relative to meta.json's ``source``) of this view's rows or ``indices``."""
        return self.column("source", indices)

    def patient_ids(self, indices=None) -> list[str]:
        """Patient ID of each row, its source where the file had none (what patient splits group by)."""
        sources = self.sources(indices)
        if "patient_id" not in self.table.columns:
            return sources
        return [p or s for p, s in zip(self.column("patient_id", indices), sources)]

    @cached_property
    def labels(self) -> np.ndarray | None:
        """float32 (N, K) in ``label_names`` order, NaN = ignore; None without labels. The whole
        table's is the memory map itself; a subset's is gathered on first use."""
        labels = self.table.labels
        if labels is None:
            return None
        return labels if self._rows is None else labels[self._rows]

    def labels_of(self, indices) -> np.ndarray:
        """float32 (B, K) labels of ``indices``, gathered from the map (no copy of the whole column)."""
        rows = self._positions(indices)
        return np.asarray(self.table.labels[rows], np.float32).reshape(len(rows), -1)

    @property
    def locations(self) -> np.ndarray:
        """int64 (N, 2): (shard, offset) of every row (for code that wants them as pairs)."""
        return np.stack([self._shard.astype(np.int64), self._offset.astype(np.int64)], 1).reshape(-1, 2)

    @cached_property
    def patients(self) -> list[str]:
        """patient_ids() of every row, as a list (compatibility; large jobs call patient_ids(indices))."""
        return self.patient_ids()

    @cached_property
    def rows(self) -> list[dict[str, str]]:
        """The rows as index.csv's dicts of strings: compatibility for small folders; it builds a
        Python dict per row, so training and evaluation use the columns instead."""
        values = [self._cells(name) for name in self.table.columns]
        if self.label_names:
            labels = self.labels
            values += [[_label_cell(v) for v in labels[:, k].tolist()] for k in range(len(self.label_names))]
        return [dict(zip(self.table.header, cells)) for cells in zip(*values)] if values else []

    def _cells(self, name: str) -> list[str]:
        """One column as the CSV's strings."""
        column = self.column(name)
        if isinstance(column, list):
            return column
        if column.dtype.kind == "U":
            return column.tolist()
        if column.dtype.kind == "f":
            return ["" if v != v else str(v) for v in column.tolist()]
        return ["" if v == columnar.MISSING_INT else str(v) for v in column.tolist()]

    @property
    def scale(self) -> float:
        return float(np.iinfo(self.dtype).max)

    def image(self, i: int) -> np.ndarray:
        return self._arrays[self._shard[i]][self._offset[i]]

    def images(self, indices) -> list[np.ndarray]:
        """Zero-copy views of the images of ``indices`` (the locations looked up at once)."""
        indices = np.asarray(indices, np.int64)
        arrays = self._arrays
        return [arrays[s][o] for s, o in zip(self._shard[indices].tolist(), self._offset[indices].tolist())]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def batch(self, indices: list[int], out: np.ndarray | None = None) -> np.ndarray:
        """Gathers images (B, size, size) in the stored dtype, into ``out`` when given (e.g. a
        view of pinned memory, saving a copy)."""
        if out is None:
            out = np.empty((len(indices), self.meta["size"], self.meta["size"]), self.dtype)
        for k, image in enumerate(self.images(indices)):
            out[k] = image
        return out


def _label_cell(value: float) -> str:
    """A label as prepare writes it: empty for NaN, integers without a decimal point."""
    if value != value:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


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
        images = self.data.images(indices)
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
            return FetchedBatch((x, torch.from_numpy(self.data.labels_of(indices))))
        return FetchedBatch(x)

    def __getitem__(self, key):
        batch = self.__getitems__([key]).value
        if self.with_labels:
            return batch[0][0], batch[1][0]
        return batch[0]
