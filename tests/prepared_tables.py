"""The CSV files a prepared folder holds, read as lists of dicts (for comparisons in tests)."""
from __future__ import annotations

import csv
from pathlib import Path


def table_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def index_rows(out: Path) -> list[dict]:
    return table_rows(out / "index.csv")
