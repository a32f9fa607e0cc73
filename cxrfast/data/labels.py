"""Label tables from the CSV formats CXR users have, mapped onto one label matrix, and the
dataset protocols around them.

Each format (NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, RSNA Pneumonia, PadChest, VinDr-CXR,
generic) is one module of :mod:`cxrfast.data.label_formats`; this module reads the CSV, picks
the format (``auto`` detects it from the columns) and applies a :class:`Protocol`: renamed
labels (``--labels_map``), a label set (``--label_set``), an official split (``--split_files``,
``--test_labels``, MIMIC's split CSV) and a view filter (``--view``). What it leaves out is
counted in the table's ``notes``, which the jobs print.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import label_formats
from .label_formats import vocabulary
from .label_formats.base import UNCERTAIN, VOTES, LabelTable, ReadOptions, Uncertainty
from .label_formats.chexpert import CHEXPERT_LABELS
from .label_formats.generic import META_COLUMNS
from .label_formats.nih14 import NIH_LABELS
from .splits import patient_split

FORMATS = label_formats.choices()
TRAINVAL = "trainval"  # a split name: train or val, decided by patient (official lists name only train+val)

__all__ = ["CHEXPERT_LABELS", "FORMATS", "META_COLUMNS", "NIH_LABELS", "Protocol", "TRAINVAL", "UNCERTAIN", "VOTES",
           "LabelTable", "filter_views", "fraction_subset", "match_files", "read_labels", "read_protocol",
           "resolve_splits", "split_name"]


@dataclass(frozen=True)
class Protocol:
    """How a dataset is used beyond its label CSV (every field optional):

    label_set: ``chexpert5`` (or another name of ``vocabulary.LABEL_SETS``) or ``A,B,C``;
    labels_map: ``From=To,...`` or a JSON file, applied before the label set;
    split_files: (train+val list, test list) of image names, e.g. NIH's two txt files;
    test_labels: a second CSV of the same format whose images are the test split (CheXpert valid.csv);
    view: ``PA,AP`` or ``frontal`` (applied where files meet rows: :func:`filter_views`);
    vote: ``majority`` or ``any`` for several readers' rows of one image (VinDr-CXR)."""

    label_set: str | None = None
    labels_map: str | None = None
    split_files: tuple[str, ...] = ()
    test_labels: str | None = None
    view: str | None = None
    vote: str = "majority"


def _option_error(exc: Exception) -> bool:
    """Errors that already name the option they are about (``--uncertain ...``) pass through as they are."""
    return str(exc).startswith("--")


def read_labels(path: str | os.PathLike, label_format: str = "auto", uncertain: str | Uncertainty = "ones",
                vote: str = "majority") -> LabelTable:
    """Reads a label CSV in any registered format (``auto`` detects it); a CSV that does not
    fit raises ValueError naming the file, the columns found and those expected."""
    try:
        options = ReadOptions(Uncertainty.parse(uncertain), vote)
    except ValueError as exc:
        raise ValueError(f"--uncertain {uncertain}: {exc}") from None
    if vote not in VOTES:
        raise ValueError(f"--rad_vote {vote}: not one of {', '.join(VOTES)}")
    fmt = None if label_format == "auto" else label_formats.get(label_format)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    try:
        fmt = fmt or label_formats.detect(columns)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    missing = fmt.missing(columns)
    if missing:
        raise ValueError(f"{path}: {fmt.name} labels need the columns {list(fmt.columns)}; found columns {columns}")
    try:
        return fmt.read(Path(path), rows, columns, options)
    except ValueError as exc:  # a label value that is not a number
        if _option_error(exc):
            raise
        raise ValueError(f"{path}: {exc}") from None


def read_protocol(path: str | os.PathLike, label_format: str = "auto", uncertain: str | Uncertainty = "ones",
                  protocol: Protocol = Protocol()) -> tuple[LabelTable, list[str]]:
    """The label table under a protocol, and one line per thing it left out or could not find
    (rows skipped while reading, labels of the set the data lacks, images in no split list)."""
    notes: list[str] = []
    table = _shaped(read_labels(path, label_format, uncertain, protocol.vote), protocol, path, notes)
    if protocol.split_files:
        table = apply_split_files(table, protocol.split_files, notes)
    if protocol.test_labels:
        test = _shaped(read_labels(protocol.test_labels, label_format, uncertain, protocol.vote), protocol,
                       protocol.test_labels, notes)
        table = with_test_split(table, test)
    return table, notes


def _shaped(table: LabelTable, protocol: Protocol, path, notes: list[str]) -> LabelTable:
    """One CSV's table renamed and cut to the label set; its skipped rows noted."""
    notes += [f"{path}: {n} {why} left out" for why, n in table.skipped.items()]
    if protocol.labels_map:
        table = rename(table, *vocabulary.labels_map(protocol.labels_map))
    if protocol.label_set:
        table, missing = select(table, vocabulary.label_set(protocol.label_set))
        if missing:
            notes.append(f"{path}: no column for {', '.join(missing)} of --label_set {protocol.label_set}; "
                         "ignored there (NaN, never a negative)")
    return table


def rename(table: LabelTable, mapping: dict[str, str], from_file: bool = False) -> LabelTable:
    """Renames label columns (by exact name, else by vocabulary key). An inline ``From=To``
    whose From is not a label is a ValueError naming it; a JSON file may list more names than
    one dataset has. Two columns renamed to one name is a ValueError."""
    names = list(table.names)
    for src, dst in mapping.items():
        i = vocabulary.find(src, names)
        if i is None:
            if from_file:
                continue
            raise ValueError(f"--labels_map {src}={dst}: {src!r} is not one of the labels ({', '.join(table.names)})")
        names[i] = dst
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--labels_map: several labels would be called {', '.join(twice)}")
    return replace(table, names=names)


def select(table: LabelTable, wanted: tuple[str, ...]) -> tuple[LabelTable, list[str]]:
    """The columns of ``wanted`` in its order and spelling (found by vocabulary key); a wanted
    label the table lacks is a column of NaN (ignored), returned as missing. None found is a
    ValueError naming the set and the labels there are."""
    cols = [vocabulary.find(n, table.names) for n in wanted]
    if all(c is None for c in cols):
        raise ValueError(f"--label_set {','.join(wanted)}: none of these is a label of the data "
                         f"({', '.join(table.names)}); named sets: {', '.join(vocabulary.LABEL_SETS)}")
    labels = np.full((len(table.keys), len(wanted)), np.nan, np.float32)
    for j, c in enumerate(cols):
        if c is not None:
            labels[:, j] = table.labels[:, c]
    return replace(table, names=list(wanted), labels=labels), [n for n, c in zip(wanted, cols) if c is None]


def _names_in(path: str) -> set[str]:
    try:
        with open(path) as f:
            return {os.path.basename(line.strip()) for line in f if line.strip()}
    except OSError as exc:
        raise ValueError(f"--split_files {path}: cannot read it ({exc.strerror or exc})") from None


def apply_split_files(table: LabelTable, files: tuple[str, ...], notes: list[str]) -> LabelTable:
    """Images named in the first list are train or val (by patient), in the second test;
    rows in neither are left out (counted in ``notes``)."""
    if len(files) != 2:
        raise ValueError(f"--split_files {','.join(files)}: needs two lists, train+val then test "
                         "(e.g. train_val_list.txt,test_list.txt)")
    trainval, test = (_names_in(f) for f in files)
    splits, rows = [], []
    for i, k in enumerate(table.keys):
        name = os.path.basename(k)
        split = "test" if name in test else TRAINVAL if name in trainval else None
        if split:
            rows.append(i)
            splits.append(split)
    if not rows:
        raise ValueError(f"--split_files {','.join(files)}: names none of the {len(table.keys)} images of the labels")
    if len(rows) < len(table.keys):
        notes.append(f"--split_files: {len(table.keys) - len(rows)} labelled images in neither list left out")
    return replace(table.take(rows), splits=splits)


def with_test_split(table: LabelTable, test: LabelTable) -> LabelTable:
    """The main table's rows as train+val (unless they name a split) and ``test``'s as the test
    split; a label one side lacks is NaN there."""
    names = list(table.names) + [n for n in test.names if vocabulary.find(n, table.names) is None]

    def spread(t: LabelTable) -> np.ndarray:
        out = np.full((len(t.keys), len(names)), np.nan, np.float32)
        for j, n in enumerate(t.names):
            out[:, vocabulary.find(n, names)] = t.labels[:, j]
        return out

    def filled(values: list, n: int) -> list:
        return values if values else [None] * n

    return LabelTable(table.keys + test.keys, names, np.concatenate([spread(table), spread(test)]),
                      filled(table.patients, len(table.keys)) + filled(test.patients, len(test.keys)),
                      [s or TRAINVAL for s in filled(table.splits, len(table.keys))] + ["test"] * len(test.keys),
                      filled(table.views, len(table.keys)) + filled(test.views, len(test.keys)))


def split_name(name: str | None) -> str | None:
    """train, val, test or trainval from the spellings datasets use (MIMIC: ``validate``)."""
    if not name or not name.strip():
        return None
    s = name.strip().lower()
    return "val" if s in ("val", "valid", "validate", "validation") else s


def resolve_splits(given: list[str | None], patients: list[str], fractions: tuple[float, float, float]) -> list[str]:
    """Each image's split: the given one when every image has one (``trainval`` ones split
    into train/val by patient in the ratio of the train and val fractions), else by patient."""
    names = [split_name(g) for g in given]
    if not names or not all(names):
        return patient_split(patients, tuple(fractions))
    train, val = fractions[0], fractions[1]
    inner = (train / (train + val), val / (train + val), 0.0) if train + val > 0 else (1.0, 0.0, 0.0)
    picks = iter(patient_split([p for p, n in zip(patients, names) if n == TRAINVAL], inner))
    return [next(picks) if n == TRAINVAL else n for n in names]


def header_view(path: Path) -> str | None:
    """The DICOM header's View Position (0018,5101); None for other files or when absent."""
    from .. import dicom
    from .files import IMAGE_SUFFIXES

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return None
    try:
        return dicom.read_header(path).get("view_position") or None
    except (dicom.DicomError, OSError):
        return None


def filter_views(files: list[Path], rows: list[int | None], table: LabelTable | None, spec: str,
                 header: Callable[[Path], str | None] = header_view) -> tuple[list[int], str]:
    """The indices of the files whose view is one of ``spec`` (``PA,AP``, ``frontal``): the
    CSV's view of its row, else the DICOM header's. Returns them and the line that counts the rest."""
    wanted = vocabulary.views(spec)
    kept, other, unknown = [], 0, 0
    for i, (f, r) in enumerate(zip(files, rows)):
        view = table.views[r] if table is not None and r is not None and table.views else None
        view = view or header(f)
        if vocabulary.view_matches(view, wanted):
            kept.append(i)
        elif view:
            other += 1
        else:
            unknown += 1
    note = (f"--view {spec}: kept {len(kept)} of {len(files)} images; left out {other} of other views"
            + (f" and {unknown} with no view in the CSV or the DICOM header" if unknown else ""))
    return kept, note


def match_files(table: LabelTable, files: list[Path], root: Path | None = None) -> tuple[list[Path], np.ndarray, list[int]]:
    """Pairs label rows with files by relative path or file name; returns (files, labels, rows)."""
    index = table.lookup()
    out_files, rows = [], []
    for p in files:
        row = next((index[k] for k in file_keys(p, root) if k in index), None)
        if row is not None:
            out_files.append(p)
            rows.append(row)
    return out_files, table.labels[rows] if rows else np.zeros((0, len(table.names)), np.float32), rows


def file_keys(path: Path, root: Path | None = None) -> list[str]:
    """What a file may be called in a label CSV: its path relative to ``root``, its name, its stem."""
    keys = [path.name, path.stem]
    if root is not None:
        try:
            keys.insert(0, path.relative_to(root).as_posix())
        except ValueError:
            pass
    return keys


def fraction_subset(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """A reproducible subset of round(n * fraction) indices (at least 1), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    k = max(1, round(n * fraction))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])
