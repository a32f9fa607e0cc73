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

Prepared in parts (``--part i/N``, or torchrun's RANK/WORLD_SIZE), part i names its shards
``shard_pIIII_NNNNN`` (manifests likewise under ``parts/``), so parts never share a file, and
writes ``parts/part_pIIII.json`` when it is done: the sources of its slice in order, its shards
and each image's label facts. The merge reads only those, never the source tree.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .data import index as columnar
from .data.index import FORMAT_VERSION

INDEX_COLUMNS = ["shard", "offset", "source", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
                 "patient_id", "view_position", "rows", "columns", "pixel_spacing_row", "pixel_spacing_col",
                 "pad_top", "pad_left", "content_h", "content_w", "split"]
ROW_COLUMNS = INDEX_COLUMNS[:-1]  # what a shard knows of an image; the split is decided for the whole index
MANIFEST_COLUMNS = ["status", "error", "detail", "key", "file_size", "file_mtime_ns"] + ROW_COLUMNS
SETTINGS = "parts/settings.json"
_SHARD = r"shard_(?:p\d{4,}_)?\d{5}"
_OWNED = re.compile(rf"({_SHARD}\.npy|\.{_SHARD}\.npy\.\d+\.tmp|index\.csv|meta\.json|errors\.csv|"
                    r"duplicates\.csv|\.(index|meta|errors|duplicates)\.(csv|json)\.\d+\.tmp)")
_OWNED_PARTS = re.compile(rf"({_SHARD}\.csv|settings\.json|part_p\d{{4,}}\.(json|tree)|merge\.lock|"
                          rf"\.({_SHARD}\.csv|settings\.json|part_p\d{{4,}}\.(json|tree))\.\d+\.tmp)")
MERGE_LOCK = "parts/merge.lock"


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


def shard_name(number: int, part: int | None = None) -> str:
    """``shard_00012`` of a one-process run, ``shard_p0003_00012`` of part 3."""
    return f"shard_{number:05d}" if part is None else f"shard_p{part:04d}_{number:05d}"


def part_path(out: Path, number: int, part: int | None = None) -> Path:
    return out / "parts" / f"{shard_name(number, part)}.csv"


def shard_path(out: Path, number: int, part: int | None = None) -> Path:
    return out / f"{shard_name(number, part)}.npy"


def write_part(out: Path, number: int, records: list[Record], part: int | None = None) -> None:
    with atomic.atomic_open(part_path(out, number, part), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(r.to_csv() for r in records)


def finished_shards(out: Path, part: int | None = None) -> list[int]:
    """Numbers of shards whose array and manifest are both complete (the manifest is written first)."""
    prefix = len(shard_name(0, part)) - 5
    pattern = shard_name(0, part)[:prefix] + "[0-9]" * 5 + ".csv"
    numbers = [int(p.stem[prefix:]) for p in (out / "parts").glob(pattern)]
    return sorted(n for n in numbers if shard_path(out, n, part).is_file())


def read_records(out: Path, numbers: list[int], part: int | None = None) -> dict[str, Record]:
    """The latest record of every source over the given shards (a later shard supersedes)."""
    records: dict[str, Record] = {}
    for n in numbers:
        path = part_path(out, n, part)
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


def claim_settings(out: Path, settings: dict) -> None:
    """Writes settings.json unless it exists, race-free between parts started together (the
    first to link its copy wins), then refuses settings that differ from the winner's."""
    check_settings(out, settings)
    path = out / SETTINGS
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        try:
            os.link(tmp, path)  # atomic, and fails when another part was first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    check_settings(out, settings)


def marker_path(out: Path, part: int) -> Path:
    return out / "parts" / f"part_p{part:04d}.json"


def write_marker(out: Path, part: int, marker: dict) -> None:
    """A part's record of a finished run (written last, atomically): what the merge reads; then
    the digest of the file list it saw, small, for the other parts to check who is done."""
    atomic.write_text(marker_path(out, part), json.dumps(marker, separators=(",", ":")) + "\n")
    atomic.write_text(marker_path(out, part).with_suffix(".tree"), marker["tree"] + "\n")


def marker_tree(out: Path, part: int) -> str | None:
    """The file-list digest of ``part``'s last finished run, or None (never finished)."""
    try:
        return marker_path(out, part).with_suffix(".tree").read_text().strip()
    except FileNotFoundError:
        return None


def read_marker(out: Path, part: int) -> dict | None:
    """The marker of ``part``, or None while that part has not finished."""
    path = marker_path(out, part)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise PrepareError(f"{path}: unreadable ({exc}); rerun that part") from None


@contextmanager
def merge_lock(out: Path):
    """One merge at a time in ``out`` (an flock: released when its process dies, so a crash
    never leaves a stale lock)."""
    fd = os.open(out / MERGE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
