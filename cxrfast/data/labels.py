"""Label tables from the CSV formats CXR users have, mapped onto one label matrix.

- NIH ChestX-ray14 ``Data_Entry_2017.csv``: ``Image Index``, ``Finding Labels`` joined by
  ``|`` ("No Finding" = all zero), ``Patient ID``.
- CheXpert ``train.csv``: ``Path`` + observation columns with 1, 0, -1 (uncertain) or blank;
  the uncertainty policy maps -1 to 1 (``ones``), 0 (``zeros``) or ignores it (``ignore``:
  the entry is masked out of the loss and the metrics). Blank means 0.
- MIMIC-CXR-JPG: ``*-chexpert.csv`` (study labels by subject_id/study_id, CheXpert
  values) joined to images through ``*-metadata.csv`` (dicom_id = file name stem).
- Generic: ``path`` + one 0/1 column per label (optional ``patient_id``).
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
META_COLUMNS = {"path", "patient_id", "split", "sex", "age", "view", "frontal/lateral", "ap/pa"}


@dataclass
class LabelTable:
    """One row per image: key (a file name or relative path), labels (N, K) float32 with
    NaN = ignore, optional patient ids and split names."""

    keys: list[str]
    names: list[str]
    labels: np.ndarray
    patients: list[str | None] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)

    def lookup(self) -> dict[str, int]:
        """Maps every key and its file name to a row index."""
        index = {}
        for i, k in enumerate(self.keys):
            index[k] = i
            index.setdefault(os.path.basename(k), i)
            index.setdefault(Path(k).stem, i)
        return index


FORMATS = ("auto", "nih14", "chexpert", "mimic", "generic")
UNCERTAIN = ("ones", "zeros", "ignore")
# the columns each format cannot do without (CheXpert and MIMIC also need observation columns)
REQUIRED = {"nih14": ("Image Index", "Finding Labels"), "chexpert": ("Path",), "mimic": ("subject_id", "study_id"),
            "generic": ("path",)}
EXPECTED = ("'path' + label columns (generic), 'Path' + CheXpert observations, 'Image Index' + 'Finding Labels' "
            "(NIH), or 'subject_id' + 'study_id' + CheXpert observations (MIMIC)")


def _detect(columns: list[str]) -> str:
    if "Image Index" in columns and "Finding Labels" in columns:
        return "nih14"
    if "subject_id" in columns and "study_id" in columns and any(c in columns for c in CHEXPERT_LABELS):
        return "mimic"
    if "Path" in columns and any(c in columns for c in CHEXPERT_LABELS):
        return "chexpert"
    if "path" in columns:
        return "generic"
    raise ValueError(f"no image path column; found columns {columns}, expected {EXPECTED}")


def read_labels(path: str | os.PathLike, label_format: str = "auto", uncertain: str = "ones") -> LabelTable:
    """Reads a label CSV in NIH, CheXpert or generic format (``auto`` detects it); a CSV that
    does not fit raises ValueError naming the file, the columns found and those expected."""
    if uncertain not in UNCERTAIN:
        raise ValueError(f"uncertain must be ones, zeros or ignore, got {uncertain!r}")
    if label_format not in FORMATS:
        raise ValueError(f"unknown label format {label_format!r} ({', '.join(FORMATS)})")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    try:
        fmt = _detect(columns) if label_format == "auto" else label_format
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    missing = [c for c in REQUIRED[fmt] if c not in columns]
    if missing:
        raise ValueError(f"{path}: {fmt} labels need the columns {list(REQUIRED[fmt])}; found columns {columns}")
    try:
        return _table(Path(path), fmt, rows, columns, uncertain)
    except ValueError as exc:  # a label value that is not a number
        raise ValueError(f"{path}: {exc}") from None


def _table(path: Path, fmt: str, rows: list[dict], columns: list[str], uncertain: str) -> LabelTable:
    if fmt == "nih14":
        names = list(NIH_LABELS)
        labels = np.zeros((len(rows), len(names)), np.float32)
        for i, r in enumerate(rows):
            for finding in r["Finding Labels"].split("|"):
                finding = finding.strip().replace(" ", "_")
                if finding in names:
                    labels[i, names.index(finding)] = 1
        return LabelTable([r["Image Index"] for r in rows], names, labels,
                          [r.get("Patient ID") for r in rows], [None] * len(rows))
    if fmt == "chexpert":
        names = [c for c in CHEXPERT_LABELS if c in columns]
        policy = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]
        labels = np.zeros((len(rows), len(names)), np.float32)
        for i, r in enumerate(rows):
            for j, n in enumerate(names):
                v = (r.get(n) or "").strip()
                labels[i, j] = policy if v in ("-1", "-1.0") else (1.0 if v in ("1", "1.0") else 0.0)
        patients = []
        for r in rows:
            m = re.search(r"(patient\d+)", r["Path"])
            patients.append(m.group(1) if m else None)
        return LabelTable([r["Path"] for r in rows], names, labels, patients, [None] * len(rows))
    if fmt == "mimic":
        return _read_mimic(path, rows, columns, uncertain)
    if fmt == "generic":
        names = [c for c in columns if c.lower() not in META_COLUMNS]
        labels = np.array([[float(r[n] or 0) for n in names] for r in rows], np.float32).reshape(len(rows), len(names))
        labels[labels < 0] = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]
        return LabelTable([r["path"] for r in rows], names, labels, [r.get("patient_id") for r in rows],
                          [r.get("split") for r in rows])
    raise ValueError(f"unknown label format {fmt!r} ({', '.join(FORMATS)})")


def _read_mimic(path: Path, rows: list[dict], columns: list[str], uncertain: str) -> LabelTable:
    """MIMIC-CXR-JPG: study labels (*-chexpert.csv) joined to images by *-metadata.csv."""
    meta_path = path.with_name(path.name.replace("chexpert", "metadata"))
    if meta_path == path or not meta_path.exists():
        raise FileNotFoundError(f"{path}: MIMIC labels need the metadata CSV beside it ({meta_path.name})")
    names = [c for c in CHEXPERT_LABELS if c in columns]
    policy = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]
    studies = {}
    for r in rows:
        vals = []
        for n in names:
            v = (r.get(n) or "").strip()
            vals.append(policy if v in ("-1", "-1.0") else (1.0 if v in ("1", "1.0") else 0.0))
        studies[(r["subject_id"], r["study_id"])] = vals
    keys, labels, patients = [], [], []
    with open(meta_path, newline="") as f:
        for m in csv.DictReader(f):
            vals = studies.get((m["subject_id"], m["study_id"]))
            if vals is None:
                continue
            keys.append(m["dicom_id"])
            labels.append(vals)
            patients.append(m["subject_id"])
    arr = np.array(labels, np.float32).reshape(len(keys), len(names))
    return LabelTable(keys, names, arr, patients, [None] * len(keys))


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
