"""Label tables from the CSV formats CXR users have, mapped onto one label matrix.

Each format (NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, RSNA Pneumonia, generic) is one module
of :mod:`cxrfast.data.label_formats`; this module reads the CSV, picks the format (``auto``
detects it from the columns) and keeps the names callers import from here.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from . import label_formats
from .label_formats.base import UNCERTAIN, LabelTable
from .label_formats.chexpert import CHEXPERT_LABELS
from .label_formats.generic import META_COLUMNS
from .label_formats.nih14 import NIH_LABELS

FORMATS = label_formats.choices()

__all__ = ["CHEXPERT_LABELS", "FORMATS", "META_COLUMNS", "NIH_LABELS", "UNCERTAIN", "LabelTable", "fraction_subset",
           "match_files", "read_labels"]


def read_labels(path: str | os.PathLike, label_format: str = "auto", uncertain: str = "ones") -> LabelTable:
    """Reads a label CSV in any registered format (``auto`` detects it); a CSV that does not
    fit raises ValueError naming the file, the columns found and those expected."""
    if uncertain not in UNCERTAIN:
        raise ValueError(f"uncertain must be ones, zeros or ignore, got {uncertain!r}")
    fmt = None if label_format == "auto" else label_formats.get(label_format)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    try:
        fmt = fmt or label_formats.detect(columns)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    missing = fmt.missing(columns)
    if missing:
        raise ValueError(f"{path}: {fmt.name} labels need the columns {list(fmt.columns)}; found columns {columns}")
    try:
        return fmt.read(Path(path), rows, columns, uncertain)
    except ValueError as exc:  # a label value that is not a number
        raise ValueError(f"{path}: {exc}") from None


def match_files(table: LabelTable, files: list[Path], root: Path | None = None) -> tuple[list[Path], np.ndarray, list[int]]:
    """Pairs label rows with files by relative path or file name; returns (files, labels, rows)."""
    index = table.lookup()
    out_files, rows = [], []
    for p in files:
        keys = [p.name]
        if root is not None:
            try:
                keys.insert(0, str(p.relative_to(root)))
            except ValueError:
                pass
        keys.append(p.stem)
        row = next((index[k] for k in keys if k in index), None)
        if row is not None:
            out_files.append(p)
            rows.append(row)
    return out_files, table.labels[rows] if rows else np.zeros((0, len(table.names)), np.float32), rows


def fraction_subset(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """A reproducible subset of round(n * fraction) indices (at least 1), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    k = max(1, round(n * fraction))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])
