"""MIMIC-CXR-JPG: ``mimic-cxr-2.0.0-chexpert.csv`` or ``-negbio.csv`` (study labels by
subject_id/study_id, CheXpert values) joined to images through ``mimic-cxr-2.0.0-metadata.csv``
beside it (dicom_id = file name stem, ViewPosition = the view). When the official
``mimic-cxr-2.0.0-split.csv`` (dicom_id, study_id, subject_id, split = train/validate/test)
lies beside it too, each image takes its split from there."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable, ReadOptions
from .chexpert import CHEXPERT_LABELS, observation_names, observations

LABELERS = ("chexpert", "negbio")  # the two label files MIMIC-CXR-JPG ships, same columns


def _beside(path: Path, what: str) -> Path | None:
    """The file of the same release called ``*-<what>.csv`` (None when the name has no labeler part)."""
    for labeler in LABELERS:
        if labeler in path.name:
            return path.with_name(path.name.replace(labeler, what))
    return None


def _metadata(path: Path) -> Path:
    meta = _beside(path, "metadata")
    if meta is None or not meta.exists():
        name = meta.name if meta else "mimic-cxr-2.0.0-metadata.csv"
        raise FileNotFoundError(f"{path}: MIMIC labels need the metadata CSV beside it ({name})")
    return meta


def _official_splits(path: Path) -> dict[str, str]:
    """dicom_id -> split from the split CSV beside the labels; empty when there is none."""
    split = _beside(path, "split")
    if split is None or not split.exists():
        return {}
    with open(split, newline="") as f:
        return {r["dicom_id"]: r["split"] for r in csv.DictReader(f)}


def read(path: Path, rows: list[dict], columns: list[str], options: ReadOptions) -> LabelTable:
    """One row per image of a labelled study; images of unlabelled studies are left out (and
    counted), and so are images the split CSV (when present) does not list."""
    meta_path = _metadata(path)
    names = observation_names(columns)
    values = observations(rows, names, options.uncertain)
    studies = {(r["subject_id"], r["study_id"]): values[i] for i, r in enumerate(rows)}
    official = _official_splits(path)
    keys, labels, patients, splits, views = [], [], [], [], []
    skipped = {"images of a study without labels": 0, "images not in the split CSV": 0}
    with open(meta_path, newline="") as f:
        for m in csv.DictReader(f):
            vals = studies.get((m["subject_id"], m["study_id"]))
            if vals is None:
                skipped["images of a study without labels"] += 1
                continue
            if official and m["dicom_id"] not in official:
                skipped["images not in the split CSV"] += 1
                continue
            keys.append(m["dicom_id"])
            labels.append(vals)
            patients.append(m["subject_id"])
            splits.append(official.get(m["dicom_id"]))
            views.append((m.get("ViewPosition") or "").strip() or None)
    arr = np.array(labels, np.float32).reshape(len(keys), len(names))
    return LabelTable(keys, names, arr, patients, splits, views, {k: v for k, v in skipped.items() if v})


FORMAT = LabelFormat("mimic", "MIMIC-CXR-JPG *-chexpert.csv or *-negbio.csv ('subject_id' + 'study_id' + CheXpert "
                     "observations, with its *-metadata.csv and optionally its *-split.csv in the same folder)",
                     ("subject_id", "study_id"), read, any_of=CHEXPERT_LABELS)
