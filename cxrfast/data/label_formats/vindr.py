"""VinDr-CXR ``image_labels_train.csv`` / ``image_labels_test.csv``: ``image_id``, ``rad_id``
(train: three radiologists' rows per image; test: one consensus row), then one 0/1 column per
finding. An image's label is the ``majority`` of its rows (more than half say 1; a tie is 0) or
``any`` row (``--rad_vote``). Images are ``<image_id>.dicom``; the view comes from the header."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import VOTES, LabelFormat, LabelTable, ReadOptions

# columns that identify VinDr-CXR among the formats (its findings beyond the NIH/CheXpert names)
VINDR_MARKERS = ("Aortic enlargement", "Nodule/Mass", "ILD", "Other lesion")
ID_COLUMNS = ("image_id", "rad_id")


def vote(values: np.ndarray, rule: str) -> np.ndarray:
    """(readers, K) 0/1 -> (K,): ``majority`` (more than half) or ``any``."""
    if rule not in VOTES:
        raise ValueError(f"--rad_vote {rule}: not one of {', '.join(VOTES)}")
    if rule == "any":
        return (values.max(0) > 0).astype(np.float32)
    return (values.sum(0) * 2 > len(values)).astype(np.float32)


def read(path: Path, rows: list[dict], columns: list[str], options: ReadOptions) -> LabelTable:
    """One row per image_id, in order of first appearance; a value that is not a number is a ValueError."""
    names = [c for c in columns if c not in ID_COLUMNS]
    by_image: dict[str, list[list[float]]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"].strip(), []).append([float(r[n] or 0) for n in names])
    ids = list(by_image)
    labels = np.array([vote(np.array(by_image[i], np.float32), options.vote) for i in ids],
                      np.float32).reshape(len(ids), len(names))
    return LabelTable([f"{i}.dicom" for i in ids], names, labels, [None] * len(ids), [None] * len(ids),
                      [None] * len(ids))


FORMAT = LabelFormat("vindr", "VinDr-CXR image_labels_train.csv ('image_id' + 'rad_id' + one 0/1 column per finding, "
                     "one row per radiologist; --rad_vote majority or any)", ("image_id",), read, any_of=VINDR_MARKERS)
