"""CheXpert ``train.csv`` / ``valid.csv``: ``Path`` + observation columns with 1, 0, -1
(uncertain) or blank (= 0); the uncertainty policy maps -1 to 1 (``ones``), 0 (``zeros``) or
NaN (``ignore``), per label if asked. The view is ``AP/PA`` (AP, PA, LL, RL) where given, else
``Frontal/Lateral``. :func:`observations` is the one place these values are parsed (MIMIC uses it too)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable, ReadOptions, Uncertainty, column

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
# the five labels of the CheXpert competition (Irvin et al. 2019)
CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
_POSITIVE = ("1", "1.0")
_UNCERTAIN = ("-1", "-1.0")


def observation_names(columns: list[str]) -> list[str]:
    """The CheXpert observations present, in the standard order."""
    return [c for c in CHEXPERT_LABELS if c in columns]


def observations(rows: list[dict], names: list[str], uncertain: "Uncertainty | str") -> np.ndarray:
    """(len(rows), len(names)) float32: 1 -> 1, -1 -> the label's policy value, 0 / blank / other -> 0."""
    policy = Uncertainty.parse(uncertain)
    policy.check(names)
    values = [policy.value(n) for n in names]
    labels = np.zeros((len(rows), len(names)), np.float32)
    for i, r in enumerate(rows):
        for j, n in enumerate(names):
            v = (r.get(n) or "").strip()
            labels[i, j] = values[j] if v in _UNCERTAIN else (1.0 if v in _POSITIVE else 0.0)
    return labels


def views(rows: list[dict]) -> list[str | None]:
    """``AP/PA`` where given, else ``Frontal/Lateral`` (a lateral has no AP/PA)."""
    return [a or b for a, b in zip(column(rows, "AP/PA"), column(rows, "Frontal/Lateral"))]


def read(path: Path, rows: list[dict], columns: list[str], options: ReadOptions) -> LabelTable:
    """Keys are the ``Path`` values; the patient id is the ``patientNNNNN`` part of the path."""
    names = observation_names(columns)
    patients = []
    for r in rows:
        m = re.search(r"(patient\d+)", r["Path"])
        patients.append(m.group(1) if m else None)
    return LabelTable([r["Path"] for r in rows], names, observations(rows, names, options.uncertain), patients,
                      [None] * len(rows), views(rows))


FORMAT = LabelFormat("chexpert", "CheXpert train.csv or valid.csv ('Path' + observation columns of 1, 0, -1 or blank)",
                     ("Path",), read, any_of=CHEXPERT_LABELS)
