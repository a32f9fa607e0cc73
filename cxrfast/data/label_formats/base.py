"""What every label format shares: the table it returns, the format object the registry
holds, and the uncertainty policy (how a -1 "uncertain" label becomes a number)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

UNCERTAIN = ("ones", "zeros", "ignore")

# reader(path of the CSV, its rows, its columns, uncertainty policy) -> LabelTable
Reader = Callable[[Path, list[dict], list[str], str], "LabelTable"]


@dataclass
class LabelTable:
    """One row per image: key (a file name or relative path), labels (N, K) float32 with
    NaN = ignore, optional patient ids and split names."""

    keys: list[str]
    names: list[str]
    labels: np.ndarray
    patients: list[str | None] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)

    def lookup(self) -> dict[str, int]:
        """Maps every key and its file name to a row index."""
        index = {}
        for i, k in enumerate(self.keys):
            index[k] = i
            index.setdefault(os.path.basename(k), i)
            index.setdefault(Path(k).stem, i)
        return index


@dataclass(frozen=True)
class LabelFormat:
    """One CSV layout. ``columns`` must all be present (checked before reading, and used by
    ``auto``); for detection at least one of ``any_of`` must be present too (when given).
    A ``fallback`` format is only detected when no other one matches."""

    name: str
    description: str
    columns: tuple[str, ...]
    reader: Reader
    any_of: tuple[str, ...] = ()
    fallback: bool = False

    def matches(self, columns: list[str]) -> bool:
        """Whether a CSV with these columns looks like this format."""
        have = set(columns)
        return all(c in have for c in self.columns) and (not self.any_of or any(c in have for c in self.any_of))

    def missing(self, columns: list[str]) -> list[str]:
        """The required columns that a CSV with these columns lacks."""
        return [c for c in self.columns if c not in columns]

    def read(self, path: Path, rows: list[dict], columns: list[str], uncertain: str) -> LabelTable:
        """The label table of an already parsed CSV (``rows`` as csv.DictReader gives them)."""
        return self.reader(path, rows, columns, uncertain)


def uncertain_value(uncertain: str) -> float:
    """The number an uncertain (-1) label becomes: 1, 0 or NaN (masked out of loss and metrics)."""
    if uncertain not in UNCERTAIN:
        raise ValueError(f"uncertain must be ones, zeros or ignore, got {uncertain!r}")
    return {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]
