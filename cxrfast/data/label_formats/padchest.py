"""PadChest ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``: ``ImageID`` (the PNG
file name), ``PatientID``, ``Projection`` (PA, L, AP, AP_horizontal, COSTAL...) and ``Labels``,
a Python list written as text, e.g. ``['pleural effusion', 'cardiomegaly']``, lower-case.
``'normal'`` means no finding (every label 0). The label columns are every finding that occurs
in the file, sorted; ``--label_set`` picks some (the shared vocabulary maps e.g.
'pleural effusion' to Effusion)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable, ReadOptions, column

NORMAL = "normal"


def findings(text: str | None) -> list[str] | None:
    """The entries of one ``Labels`` cell (stripped, lower-case, blanks dropped); None when the
    cell is not a list of strings (PadChest has a few empty or broken ones)."""
    try:
        value = ast.literal_eval((text or "").strip())
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return [v.strip().lower() for v in value if v.strip()]


def read(path: Path, rows: list[dict], columns: list[str], options: ReadOptions) -> LabelTable:
    """One row per image whose ``Labels`` parse; the others are left out and counted."""
    parsed = [findings(r.get("Labels")) for r in rows]
    kept = [i for i, p in enumerate(parsed) if p is not None]
    names = sorted({f for i in kept for f in parsed[i]} - {NORMAL})
    where = {n: j for j, n in enumerate(names)}
    labels = np.zeros((len(kept), len(names)), np.float32)
    for k, i in enumerate(kept):
        for f in parsed[i]:
            if f != NORMAL:
                labels[k, where[f]] = 1
    rows = [rows[i] for i in kept]
    skipped = {"rows whose Labels are not a list": len(parsed) - len(kept)}
    return LabelTable([r["ImageID"].strip() for r in rows], names, labels, column(rows, "PatientID"),
                      [None] * len(rows), column(rows, "Projection"), {k: v for k, v in skipped.items() if v})


FORMAT = LabelFormat("padchest", "PadChest PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv ('ImageID' + 'Labels' "
                     "as a list like ['pleural effusion'], 'normal' = no finding; 'Projection' is the view)",
                     ("ImageID", "Labels"), read)
