"""NIH ChestX-ray14 ``Data_Entry_2017.csv``: ``Image Index``, ``Finding Labels`` joined by ``|``
("No Finding" = all zero), ``Patient ID``, ``View Position`` (PA or AP). The official split
is two lists of image names (``train_val_list.txt``, ``test_list.txt``): ``--split_files``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable, ReadOptions, column

NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def read(path: Path, rows: list[dict], columns: list[str], options: ReadOptions) -> LabelTable:
    """All 14 findings for every image; a finding outside the 14 is dropped."""
    names = list(NIH_LABELS)
    labels = np.zeros((len(rows), len(names)), np.float32)
    for i, r in enumerate(rows):
        for finding in r["Finding Labels"].split("|"):
            finding = finding.strip().replace(" ", "_")
            if finding in names:
                labels[i, names.index(finding)] = 1
    return LabelTable([r["Image Index"] for r in rows], names, labels,
                      [r.get("Patient ID") for r in rows], [None] * len(rows), column(rows, "View Position"))


FORMAT = LabelFormat("nih14", "NIH ChestX-ray14 Data_Entry_2017.csv ('Image Index' + 'Finding Labels')",
                     ("Image Index", "Finding Labels"), read)
