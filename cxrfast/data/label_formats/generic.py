"""Generic: ``path`` + one 0/1 column per label (optional ``patient_id``, ``split`` and
``view``); a negative value is uncertain and follows the policy. Detected only when nothing
else fits."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import LabelFormat, LabelTable, ReadOptions, column

META_COLUMNS = {"path", "patient_id", "split", "sex", "age", "view", "frontal/lateral", "ap/pa"}


def read(path: Path, rows: list[dict], columns: list[str], options: ReadOptions) -> LabelTable:
    """Every column that is not metadata is a label; a value that is not a number is a ValueError."""
    names = [c for c in columns if c.lower() not in META_COLUMNS]
    options.uncertain.check(names)
    labels = np.array([[float(r[n] or 0) for n in names] for r in rows], np.float32).reshape(len(rows), len(names))
    for j, n in enumerate(names):
        labels[labels[:, j] < 0, j] = options.uncertain.value(n)
    view = next((c for c in columns if c.lower() == "view"), None)
    return LabelTable([r["path"] for r in rows], names, labels, [r.get("patient_id") for r in rows],
                      [r.get("split") for r in rows], column(rows, view) if view else [None] * len(rows))


FORMAT = LabelFormat("generic", "'path' + one 0/1 column per label (optional 'patient_id', 'split', 'view')",
                     ("path",), read, fallback=True)
