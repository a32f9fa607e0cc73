"""MIMIC-CXR-JPG: ``*-chexpert.csv`` (study labels by subject_id/study_id, CheXpert values)
joined to images through ``*-metadata.csv`` beside it (dicom_id = file name stem)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable
from .chexpert import CHEXPERT_LABELS, observation_names, observations


def _metadata(path: Path) -> Path:
    meta = path.with_name(path.name.replace("chexpert", "metadata"))
    if meta == path or not meta.exists():
        raise FileNotFoundError(f"{path}: MIMIC labels need the metadata CSV beside it ({meta.name})")
    return meta


def read(path: Path, rows: list[dict], columns: list[str], uncertain: str) -> LabelTable:
    """One row per image of a labelled study; images of unlabelled studies are left out."""
    meta_path = _metadata(path)
    names = observation_names(columns)
    values = observations(rows, names, uncertain)
    studies = {(r["subject_id"], r["study_id"]): values[i] for i, r in enumerate(rows)}
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


FORMAT = LabelFormat("mimic", "MIMIC-CXR-JPG *-chexpert.csv ('subject_id' + 'study_id' + CheXpert observations, "
                     "with its *-metadata.csv in the same folder)",
                     ("subject_id", "study_id"), read, any_of=CHEXPERT_LABELS)
