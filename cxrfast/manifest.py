"""What ``cxrfast.prepare`` wrote into an output folder, so that a rerun can trust it.

Every source file a run saw is recorded in exactly one shard's manifest
(``parts/shard_00000.csv``) with its size and modification time and what became of it: an
``image`` (its index row), an ``error`` (why it could not be read) or a ``duplicate`` (of
which image). A rerun reads the manifests of finished shards instead of recomputing which
file goes where, so new, removed or changed files never shift shard boundaries: a record
stays valid while its file is unchanged (and, for a duplicate, while its image is), every
other file is decoded into new shards. The settings that shape the shards are written to
``parts/settings.json`` before the first shard, so a rerun with other settings is caught even
after a crash.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .data import index as columnar
from .data.shards import FORMAT_VERSION

INDEX_COLUMNS = ["shard", "offset", "source", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
                 "patient_id", "view_position", "rows", "columns", "pixel_spacing_row", "pixel_spacing_col",
                 "pad_top", "pad_left", "content_h", "content_w", "split"]
ROW_COLUMNS = INDEX_COLUMNS[:-1]  # what a shard knows of an image; the split is decided for the whole index
MANIFEST_COLUMNS = ["status", "error", "detail", "key", "file_size", "file_mtime_ns"] + ROW_COLUMNS
SETTINGS = "parts/settings.json"
_OWNED = re.compile(r"(shard_\d{5}\.npy|\.shard_\d{5}\.npy\.\d+\.tmp|index\.csv|meta\.json|errors\.csv|"
                    r"duplicates\.csv|\.(index|meta|errors|duplicates)\.(csv|json)\.\d+\.tmp)")
_OWNED_PARTS = re.compile(r"(shard_\d{5}\.csv|settings\.json|\.(shard_\d{5}\.csv|settings\.json)\.\d+\.tmp)")


class PrepareError(ValueError):
    """A problem with prepare's inputs or output folder that the user can fix (CLI: ``error: ...``)."""


@dataclass
class Record:
    """One source file in one shard's manifest (a row of MANIFEST_COLUMNS)."""

    source: str  # relative to SRC when it lies under it
    status: str  # "image", "error" or "duplicate"
    stamp: tuple[int, int]  # (size, mtime_ns) when read; (-1, -1) when it could not be stat'ed
    key: str = ""  # SOP Instance UID or content hash
    error: str = ""  # exception type for an error
    detail: str = ""  # the reason for an error; the image's source for a duplicate
    row: list | None = None  # ROW_COLUMNS for an image

    def to_csv(self) -> list:
        row = self.row or [""] * len(ROW_COLUMNS)
        return [self.status, self.error, self.detail, self.key, *self.stamp] + row[:2] + [self.source] + row[3:]

    @classmethod
    def from_csv(cls, d: dict[str, str]) -> "Record":
        row = [d[c] for c in ROW_COLUMNS] if d["status"] == "image" else None
        return cls(d["source"], d["status"], (int(d["file_size"]), int(d["file_mtime_ns"])), d["key"],
                   d["error"], d["detail"], row)


def stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): a file whose stamp changed is read again."""
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def part_path(out: Path, number: int) -> Path:
    return out / "parts" / f"shard_{number:05d}.csv"


def shard_path(out: Path, number: int) -> Path:
    return out / f"shard_{number:05d}.npy"


def write_part(out: Path, number: int, records: list[Record]) -> None:
    with atomic.atomic_open(part_path(out, number), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(r.to_csv() for r in records)


def finished_shards(out: Path) -> list[int]:
    """Numbers of shards whose array and manifest are both complete (the manifest is written first)."""
    numbers = [int(p.stem[6:]) for p in (out / "parts").glob("shard_[0-9][0-9][0-9][0-9][0-9].csv")]
    return sorted(n for n in numbers if shard_path(out, n).is_file())


def read_records(out: Path, numbers: list[int]) -> dict[str, Record]:
    """The latest record of every source over the given shards (a later shard supersedes)."""
    records: dict[str, Record] = {}
    for n in numbers:
        path = part_path(out, n)
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != MANIFEST_COLUMNS:
                raise PrepareError(f"{path}: not a manifest of this cxrfast (columns {reader.fieldnames}); "
                                   "rerun with --overwrite")
            for d in reader:
                records[d["source"]] = Record.from_csv(d)
    return records


def live(records: dict[str, Record], stamps: dict[str, tuple[int, int]]) -> dict[str, Record]:
    """The records still true of the tree: the file is there, unchanged, and a duplicate's image is live."""
    kept = {s: r for s, r in records.items() if s in stamps and stamps[s] == r.stamp}
    return {s: r for s, r in kept.items()
            if r.status != "duplicate" or (r.detail in kept and kept[r.detail].status == "image"
                                           and kept[r.detail].key == r.key)}


def check_settings(out: Path, settings: dict) -> None:
    """Refuses an output folder prepared with other settings (or by an older cxrfast)."""
    path = out / SETTINGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as exc:
            raise PrepareError(f"{path}: unreadable ({exc}); rerun with --overwrite") from None
        for key, value in settings.items():
            if old.get(key) != value:
                raise PrepareError(f"{out} was prepared with {key} {old.get(key)!r}, not {value!r}; use another "
                                   "output folder or --overwrite to rebuild it")
        return
    if (out / "meta.json").is_file():
        try:
            version = json.loads((out / "meta.json").read_text()).get("format_version")
        except (ValueError, AttributeError):
            version = None
        raise PrepareError(f"{out} holds a dataset prepared by another cxrfast version (format_version {version!r}, "
                           f"this one writes {FORMAT_VERSION}); rerun with --overwrite to rebuild it")
    if any(out.glob("shard_[0-9][0-9][0-9][0-9][0-9].npy")):
        raise PrepareError(f"{out} holds shards without a record of their settings ({SETTINGS}); "
                           "rerun with --overwrite to rebuild it")


def write_settings(out: Path, settings: dict) -> None:
    atomic.write_text(out / SETTINGS, json.dumps(settings, indent=2) + "\n")


def remove_outputs(out: Path) -> list[Path]:
    """--overwrite: deletes what prepare writes (shards, manifests, index, meta, errors, duplicates)
    and nothing else; returns what it removed."""
    removed = columnar.remove(out)
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        if p.is_file() and _OWNED.fullmatch(p.name):
            p.unlink()
            removed.append(p)
    parts = out / "parts"
    if parts.is_dir():
        for p in parts.iterdir():
            if p.is_file() and _OWNED_PARTS.fullmatch(p.name):
                p.unlink()
                removed.append(p)
        if not any(parts.iterdir()):
            parts.rmdir()
    return removed


def write_table(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_logs(out: Path, records: dict[str, Record]) -> None:
    """errors.csv and duplicates.csv from the live records: rewritten whole, so reruns never repeat a row."""
    skipped = sorted((r for r in records.values() if r.status != "image"), key=lambda r: r.source)
    write_table(out / "errors.csv", ["source", "error", "reason"],
                [[r.source, r.error, r.detail] for r in skipped if r.status == "error"])
    write_table(out / "duplicates.csv", ["source", "duplicate_of", "key"],
                [[r.source, r.detail, r.key] for r in skipped if r.status == "duplicate"])
