"""Labelled data for fine-tuning and evaluation: files paired with label rows under a dataset
protocol (label set, renamed labels, official splits, views), patient-level splits,
label-fraction subsets."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from cxrfast import cli, dicom
from cxrfast.data.labels import TRAINVAL, Protocol, filter_views, fraction_subset, match_files, resolve_splits

from .config import UsageError


@dataclass
class Split:
    files: list[Path]
    labels: np.ndarray
    patients: Optional[list[Optional[str]]] = None  # the label CSV's patient id of each file, where it has one


@dataclass
class LabelledData:
    names: list[str]
    splits: dict[str, Split]
    notes: list[str] = field(default_factory=list)  # what the protocol left out, counted (to print)


def _patient_of(path: Path) -> str:
    try:
        pid = dicom.read_header(path).get("patient_id")
    except dicom.DicomError:
        pid = None
    return pid or path.stem


def load(data: str, labels: str, label_format: str = "auto", uncertain: str = "ones",
         label_fraction: float = 1.0, fractions: tuple[float, ...] = (0.7, 0.1, 0.2), seed: int = 0,
         protocol: Protocol | None = None) -> LabelledData:
    """Pairs files with labels; keeps the views asked for; splits by the labels' own splits
    (a split column, --split_files, --test_labels, MIMIC's split CSV) or by patient; subsets
    train. A missing or empty --data, an unreadable label CSV or no match between them is a
    UsageError."""
    protocol = protocol or Protocol()
    table, notes = cli.label_protocol(labels, label_format, uncertain, protocol=protocol)
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    files, y, rows = match_files(table, cli.image_files(data), root)
    if not files:
        raise UsageError(f"--labels {labels}: no file under {data} matches one of its rows")
    if protocol.view:
        kept, note = filter_views(files, rows, table, protocol.view)
        notes.append(note)
        if not kept:
            raise UsageError(f"--view {protocol.view}: none of the {len(files)} labelled images has that view")
        files, y, rows = [files[i] for i in kept], y[kept], [rows[i] for i in kept]
    given = [table.splits[r] if table.splits else None for r in rows]
    patients = [(table.patients[r] if table.patients and table.patients[r] else None) or None for r in rows]
    if not all(given) or any(g and g.lower() == TRAINVAL for g in given):
        patients = [p or _patient_of(f) for p, f in zip(patients, files)]
    names = resolve_splits(given, patients, tuple(fractions))
    splits = {}
    for split in ("train", "val", "test"):
        idx = np.array([i for i, n in enumerate(names) if n == split], dtype=np.int64)
        if split == "train" and len(idx) and label_fraction < 1.0:
            idx = idx[fraction_subset(len(idx), label_fraction, seed)]
        splits[split] = Split([files[i] for i in idx], y[idx] if len(idx) else np.zeros((0, y.shape[1]), np.float32),
                              [patients[i] for i in idx])
    return LabelledData(list(table.names), splits, notes)


def load_prepared(folder: str, label_fraction: float = 1.0, seed: int = 0):
    """(label names, {split: PreparedData}) from a prepared folder's index (its split and
    label_<name> columns); the train split is subset to ``label_fraction``."""
    from cxrfast.data.shards import PreparedData

    full = PreparedData(folder)
    if not full.label_names:
        raise UsageError(f"--data {folder}: a prepared folder without labels; prepare it with --labels")
    splits = {}
    for split in ("train", "val", "test"):
        idx = full.where("split", split)
        if split == "train" and len(idx) and label_fraction < 1.0:
            idx = idx[fraction_subset(len(idx), label_fraction, seed)]
        splits[split] = full.subset(idx)
    return full.label_names, splits


# the help of the protocol options, shared by train.finetune and train.evaluate (and prepare's)
HELP = {
    "label_set": "train/evaluate these labels only: chexpert5 (Atelectasis, Cardiomegaly, Consolidation, Edema, "
                 "Pleural Effusion), chexpert14, nih14, or names A,B,C; a label the data lacks is ignored (NaN)",
    "labels_map": "rename the data's labels, From=To,... (e.g. Effusion=\"Pleural Effusion\") or a JSON file "
                  "{\"From\": \"To\"}; known synonyms (NIH Effusion = CheXpert Pleural Effusion, ...) match anyway",
    "split_files": "official split as two lists of image names, train+val then test (NIH: "
                   "train_val_list.txt,test_list.txt); train/val inside the first by patient",
    "test_labels": "a second label CSV of the same format whose images are the test split (CheXpert valid.csv); "
                   "the --labels images are then split into train/val by patient",
    "view": "keep only these views: PA,AP (or frontal, lateral), from the CSV (NIH View Position, CheXpert AP/PA "
            "and Frontal/Lateral, MIMIC ViewPosition, PadChest Projection) or else the DICOM header",
    "rad_vote": "several radiologists' rows per image (VinDr-CXR): majority (more than half) or any",
}


def check_options(uncertain: str | None, label_set: str | None, labels_map: str | None, view: str | None) -> None:
    """Checks the protocol options' syntax before anything is read or written; a mistake is a
    UsageError naming the option and its value."""
    from cxrfast.data.label_formats import Uncertainty, vocabulary

    checks = [("--uncertain", uncertain, Uncertainty.parse), ("--label_set", label_set, vocabulary.label_set),
              ("--labels_map", labels_map, vocabulary.labels_map), ("--view", view, vocabulary.views)]
    for option, value, parse in checks:
        if value is None:
            continue
        try:
            parse(value)
        except ValueError as exc:
            message = str(exc)
            raise UsageError(message if message.startswith("--") else f"{option} {value}: {message}") from None


def protocol(label_set: str | None = None, labels_map: str | None = None, split_files=None,
             test_labels: str | None = None, view: str | None = None, rad_vote: str = "majority") -> Protocol:
    """A Protocol from config values (a saved config holds split_files as a list)."""
    return Protocol(label_set or None, labels_map or None, tuple(split_files or ()), test_labels or None, view or None,
                    rad_vote or "majority")


PROTOCOL_OPTIONS = ("label_set", "labels_map", "split_files", "test_labels", "view", "rad_vote")


def protocol_of(cfg) -> Protocol:
    """The Protocol of a config that has the PROTOCOL_OPTIONS fields."""
    return protocol(*(getattr(cfg, name) for name in PROTOCOL_OPTIONS))


def protocol_argv(cfg) -> list[str]:
    """The PROTOCOL_OPTIONS a config sets, as command-line options (for a run it starts)."""
    argv = []
    for name in PROTOCOL_OPTIONS:
        value = getattr(cfg, name)
        if value is not None:
            argv += [f"--{name}", ",".join(value) if isinstance(value, (tuple, list)) else str(value)]
    return argv
