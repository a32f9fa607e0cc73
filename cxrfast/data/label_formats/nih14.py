"""NIH ChestX-ray14 ``Data_Entry_2017.csv``: ``Image Index``, ``Finding Labels`` joined by ``|``
("No Finding" = all zero), ``Patient ID``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable

NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def read(path: Path, rows: list[dict], columns: list[str], uncertain: str) -> LabelTable:
    """All 14 findings for every image; a finding outside the 14 is dropped."""
    names = list(NIH_LABELS)
    labels = np.zeros((len(rows), len(names)), np.float32)
    for i, r in enumerate(rows):
        for finding in r["Finding Labels"].split("|"):
            finding = finding.strip().replace(" ", "_")
            if finding in names:
                labels[i, names.index(finding)] = 1
    return LabelTable([r["Image Index"] for r in rows], names, labels,
                      [r.get("Patient ID") for r in rows], [None] * len(rows))


FORMAT = LabelFormat("nih14", "NIH ChestX-ray14 Data_Entry_2017.csv ('Image Index' + 'Finding Labels')",
                     ("Image Index", "Finding Labels"), read)
