"""Labelled data for fine-tuning and evaluation: files paired with label rows, patient-level
splits, label-fraction subsets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cxrfast import cli, dicom
from cxrfast.data import patient_split
from cxrfast.data.labels import fraction_subset, match_files

from .config import UsageError


@dataclass
class Split:
    files: list[Path]
    labels: np.ndarray
    patients: Optional[list[Optional[str]]] = None  # the label CSV's patient id of each file, where it has one


@dataclass
class LabelledData:
    names: list[str]
    splits: dict[str, Split]


def _patient_of(path: Path) -> str:
    try:
        pid = dicom.read_header(path).get("patient_id")
    except dicom.DicomError:
        pid = None
    return pid or path.stem


def load(data: str, labels: str, label_format: str = "auto", uncertain: str = "ones",
         label_fraction: float = 1.0, fractions: tuple[float, ...] = (0.7, 0.1, 0.2), seed: int = 0) -> LabelledData:
    """Pairs files with labels; splits by the CSV's split column or by patient; subsets train.
    A missing or empty --data, an unreadable label CSV or no match between them is a UsageError."""
    table = cli.label_table(labels, label_format, uncertain)
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    files, y, rows = match_files(table, cli.image_files(data), root)
    if not files:
        raise UsageError(f"--labels {labels}: no file under {data} matches one of its rows")
    given = [table.splits[r] if table.splits else None for r in rows]
    if all(given):
        names = [g.lower().replace("validation", "val").replace("valid", "val") for g in given]
    else:
        patients = [(table.patients[r] if table.patients and table.patients[r] else None) or _patient_of(f)
                    for r, f in zip(rows, files)]
        names = patient_split(patients, tuple(fractions))
    splits = {}
    for split in ("train", "val", "test"):
        idx = np.array([i for i, n in enumerate(names) if n == split], dtype=np.int64)
        if split == "train" and len(idx) and label_fraction < 1.0:
            idx = idx[fraction_subset(len(idx), label_fraction, seed)]
        splits[split] = Split([files[i] for i in idx], y[idx] if len(idx) else np.zeros((0, y.shape[1]), np.float32),
                              [table.patients[rows[i]] or None for i in idx] if table.patients else None)
    return LabelledData(list(table.names), splits)


def load_prepared(folder: str, label_fraction: float = 1.0, seed: int = 0):
    """(label names, {split: PreparedData}) from a prepared folder's index (its split and
    label_<name> columns); the train split is subset to ``label_fraction``."""
    from cxrfast.data.shards import PreparedData

    full = PreparedData(folder)
    if not full.label_names:
        raise UsageError(f"--data {folder}: a prepared folder without labels; prepare it with --labels")
    splits = {}
    for split in ("train", "val", "test"):
        idx = np.array([i for i, r in enumerate(full.rows) if r["split"] == split], dtype=np.int64)
        if split == "train" and len(idx) and label_fraction < 1.0:
            idx = idx[fraction_subset(len(idx), label_fraction, seed)]
        splits[split] = full.subset(idx.tolist())
    return full.label_names, splits
