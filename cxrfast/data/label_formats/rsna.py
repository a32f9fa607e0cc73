"""RSNA Pneumonia Detection ``stage_2_train_labels.csv``: ``patientId,x,y,width,height,Target``
with one row per box (or one row with Target 0 and no box); the image is ``<patientId>.dcm``
and its label ``Pneumonia`` is the largest Target over its rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable, ReadOptions


def read(path: Path, rows: list[dict], columns: list[str], options: ReadOptions) -> LabelTable:
    """One row per patientId, in order of first appearance; a Target that is not a number is a ValueError."""
    target: dict[str, float] = {}
    for r in rows:
        pid = r["patientId"].strip()
        value = float(r["Target"])
        target[pid] = max(target.get(pid, value), value)
    ids = list(target)
    labels = np.array([[target[p]] for p in ids], np.float32).reshape(len(ids), 1)
    return LabelTable([f"{p}.dcm" for p in ids], ["Pneumonia"], labels, ids, [None] * len(ids))


FORMAT = LabelFormat("rsna", "RSNA Pneumonia stage_2_train_labels.csv ('patientId' + 'Target', one row per box)",
                     ("patientId", "Target"), read)
