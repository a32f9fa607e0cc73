"""The columnar index of a prepared folder: one ``.npy`` per column under ``index/``.

``index.csv`` is for people and pandas; at 10 M rows reading it into Python objects costs
gigabytes per rank and minutes. The same table is written beside it as plain numpy files that
every rank memory-maps (the OS page cache shares the pages between the processes of a node),
so a job touches only the columns it reads:

  index/<int column>.npy        int16/int32/int64 (N,), -1 where the CSV cell is empty
  index/<float column>.npy      float64 (N,), NaN where empty
  index/<category>.npy          int8/int16 codes (N,); the values are listed in meta.json
  index/<text>.offsets.npy      int64 (N+1,) byte offsets into
  index/<text>.blob.npy         uint8 (M,), the UTF-8 strings end to end
  index/labels.npy              float32 (N, K) in meta.json's label_names order, NaN = ignore

meta.json's ``index`` entry lists the columns in CSV order with their kind (and a category's
values), the row count and the byte size of the index.csv written with them.
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import atomic

# The prepared folder's layout (meta.json's format_version), here beside the index so that
# preparing a folder imports no torch.
FORMAT_VERSION = 2  # 2: per-shard manifests and recorded settings (parts/); 1 could mix shards of two sizes

INDEX_DIR = "index"
INT_COLUMNS = ("shard", "offset", "rows", "columns", "pad_top", "pad_left", "content_h", "content_w")
FLOAT_COLUMNS = ("pixel_spacing_row", "pixel_spacing_col")
CATEGORY_COLUMNS = ("split", "view_position")
MISSING_INT = -1  # an empty integer cell (no Rows in the header, say); never a real value of these columns
LABEL_PREFIX = "label_"
_OWNED = re.compile(r"[a-z0-9_]+(\.offsets|\.blob)?\.npy|\.[a-z0-9_.]+\.npy\.\d+\.tmp")


class PreparedFormatError(ValueError):
    """A prepared folder this cxrfast cannot read as it is (other format version, inconsistent shards)."""


class Text:
    """A column of strings as byte offsets into one UTF-8 blob: no Python object per row until asked."""

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        self.offsets, self.blob = offsets, blob

    @classmethod
    def from_strings(cls, values) -> "Text":
        encoded = [("" if v is None else str(v)).encode() for v in values]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(encoded), np.uint8).copy())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def take(self, rows: np.ndarray | None = None) -> list[str]:
        """The strings of ``rows`` (all when None)."""
        rows = range(len(self)) if rows is None else np.asarray(rows).tolist()
        offsets, blob = self.offsets, self.blob
        return [blob[offsets[i]:offsets[i + 1]].tobytes().decode() for i in rows]


class Category:
    """A column of few distinct strings (split, view) as small integer codes into ``values``."""

    def __init__(self, codes: np.ndarray, values: list[str]):
        self.codes, self.values = codes, list(values)

    @classmethod
    def from_strings(cls, strings) -> "Category":
        values, codes = np.unique(np.array(["" if s is None else str(s) for s in strings], dtype=str),
                                  return_inverse=True)
        dtype = np.int8 if len(values) <= 127 else np.int16 if len(values) <= 32767 else np.int32
        return cls(codes.astype(dtype), [str(v) for v in values])

    def __len__(self) -> int:
        return len(self.codes)

    def code(self, value: str) -> int:
        """The code of ``value``; -1 (matches no row) when no row has it."""
        return self.values.index(value) if value in self.values else -1

    def take(self, rows: np.ndarray | None = None) -> np.ndarray:
        codes = self.codes if rows is None else self.codes[rows]
        return np.array(self.values, dtype=str)[codes] if self.values else np.zeros(len(codes), str)


Column = np.ndarray | Text | Category


@dataclass
class Table:
    """An index: its columns in CSV order (labels apart, as one (N, K) float32 array)."""

    rows: int
    columns: dict[str, Column]
    label_names: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None

    @property
    def header(self) -> list[str]:
        return list(self.columns) + [LABEL_PREFIX + n for n in self.label_names]


def _number(value, kind: type):
    if value is None or value == "":
        return None
    return kind(value)


def smallest_int(values: np.ndarray) -> np.ndarray:
    """The narrowest of int16/int32/int64 that holds ``values`` (shard numbers fit int16 up to 32767 shards)."""
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if not len(values) or (values.min() >= info.min and values.max() <= info.max):
            return values.astype(dtype)
    return values


def _column(name: str, values) -> Column:
    """One CSV column (strings, or the values prepare wrote) in its stored form."""
    if name in INT_COLUMNS:
        ints = [_number(v, int) for v in values]
        return smallest_int(np.array([MISSING_INT if v is None else v for v in ints], np.int64))
    if name in FLOAT_COLUMNS:
        return np.array([math.nan if v is None else v for v in (_number(v, float) for v in values)], np.float64)
    if name in CATEGORY_COLUMNS:
        return Category.from_strings(values)
    return Text.from_strings(values)


def from_rows(header: list[str], rows: list[list], label_names: list[str]) -> Table:
    """The table of CSV-shaped rows (``header`` may lack columns, a hand-written index.csv does)."""
    cells = list(zip(*rows)) if rows else [()] * len(header)
    by_name = dict(zip(header, cells))
    missing = [n for n in label_names if LABEL_PREFIX + n not in by_name]
    if missing:
        raise PreparedFormatError(f"index.csv lacks the label columns {', '.join(LABEL_PREFIX + n for n in missing)}")
    columns = {name: _column(name, values) for name, values in by_name.items() if not _is_label(name, label_names)}
    labels = None
    if label_names:
        labels = np.array([[math.nan if v is None else v for v in (_number(x, float) for x in by_name[LABEL_PREFIX + n])]
                           for n in label_names], np.float32).T.reshape(len(rows), len(label_names))
    return Table(len(rows), columns, list(label_names), labels)


def _is_label(name: str, label_names: list[str]) -> bool:
    return name.startswith(LABEL_PREFIX) and name[len(LABEL_PREFIX):] in label_names


def read_csv(path: str | os.PathLike, label_names: list[str]) -> Table:
    """index.csv as a table (the path for folders without ``index/``); rows never become dicts."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise PreparedFormatError(f"{path}: empty, not an index")
        return from_rows(header, list(reader), label_names)


def _files(name: str, column: Column) -> dict[str, np.ndarray]:
    if isinstance(column, Text):
        return {f"{name}.offsets.npy": column.offsets, f"{name}.blob.npy": column.blob}
    if isinstance(column, Category):
        return {f"{name}.npy": column.codes}
    return {f"{name}.npy": column}


def _spec(column: Column) -> dict:
    if isinstance(column, Text):
        return {"kind": "text"}
    if isinstance(column, Category):
        return {"kind": "category", "values": column.values}
    return {"kind": "float" if column.dtype.kind == "f" else "int"}


def write(folder: str | os.PathLike, table: Table) -> dict:
    """Writes ``index/`` (each file atomically); returns the meta.json entry that describes it.

    meta.json is written after it by the caller: a crash in between leaves the old entry, which
    a reader checks against the files (row counts) before trusting them."""
    out = Path(folder) / INDEX_DIR
    out.mkdir(parents=True, exist_ok=True)
    arrays = {file: array for name, column in table.columns.items() for file, array in _files(name, column).items()}
    if table.labels is not None:
        arrays["labels.npy"] = np.ascontiguousarray(table.labels, np.float32)
    for file, array in arrays.items():
        with atomic.atomic_open(out / file) as f:
            np.save(f, array)
    return {"rows": table.rows, "columns": {name: _spec(c) for name, c in table.columns.items()},
            "labels": table.labels is not None}


def _open(path: Path, rows: int | None) -> np.ndarray:
    """One memory-mapped column file (no page is read yet), refused unless it has ``rows`` rows."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise PreparedFormatError(f"{path}: unreadable ({exc}); rerun `python -m cxrfast.prepare SRC "
                                  f"{path.parent.parent}` to rewrite the index") from None
    if rows is not None and len(array) != rows:
        raise PreparedFormatError(f"{path}: {len(array)} rows, meta.json says {rows}; rerun "
                                  f"`python -m cxrfast.prepare SRC {path.parent.parent}` to rewrite the index")
    return np.asarray(array)  # a plain ndarray view of the map: indexing it is ~30x faster than np.memmap's


def load(folder: str | os.PathLike, spec: dict, label_names: list[str]) -> Table:
    """The table of ``index/`` as described by meta.json's ``spec``, every column memory-mapped."""
    base, rows = Path(folder) / INDEX_DIR, int(spec["rows"])
    columns: dict[str, Column] = {}
    for name, column in spec["columns"].items():
        if column["kind"] == "text":
            offsets, blob = _open(base / f"{name}.offsets.npy", rows + 1), _open(base / f"{name}.blob.npy", None)
            columns[name] = Text(offsets, blob)
        elif column["kind"] == "category":
            columns[name] = Category(_open(base / f"{name}.npy", rows), column["values"])
        else:
            columns[name] = _open(base / f"{name}.npy", rows)
    labels = None
    if spec.get("labels"):
        labels = _open(base / "labels.npy", rows)
        if labels.shape != (rows, len(label_names)):
            raise PreparedFormatError(f"{base / 'labels.npy'}: shape {labels.shape}, meta.json names "
                                      f"{len(label_names)} labels")
    return Table(rows, columns, list(label_names), labels)


def remove(folder: str | os.PathLike) -> list[Path]:
    """--overwrite: deletes the files :func:`write` makes (and nothing else); returns them."""
    base = Path(folder) / INDEX_DIR
    if not base.is_dir():
        return []
    removed = [p for p in base.iterdir() if p.is_file() and _OWNED.fullmatch(p.name)]
    for p in removed:
        p.unlink()
    if not any(base.iterdir()):
        base.rmdir()
    return removed
