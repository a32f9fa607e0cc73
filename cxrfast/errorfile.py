"""The errors file: one name and one layout for the files a command skipped.

``python -m cxrfast.prepare``, pretraining, fine-tuning and evaluation all list the files they
could not read in ``errors.csv`` (fine-tuning's validation in ``val_errors.csv``) with the same
columns, ``source,error,reason``: the file, the exception's class name and its message, so one
script reads the errors of every stage.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a rare duplicate row is the worst case
    fcntl = None  # type: ignore[assignment]

from .atomic import atomic_open

NAME = "errors.csv"
COLUMNS = ("source", "error", "reason")


def row(source: str | os.PathLike, exc: BaseException) -> tuple[str, str, str]:
    """(source, error class name, message on one line) for a file that could not be read."""
    return str(source), type(exc).__name__, " ".join(str(exc).split())


def write(path: str | os.PathLike, rows: Iterable[Sequence[str]]) -> None:
    """The whole file, atomically: a rerun replaces it (a clean run leaves only the header)."""
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def _line(fields: Sequence[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(fields)
    return buf.getvalue().encode()


def _sources(fd: int) -> set[str]:
    """The sources (first column) listed in the errors file open as ``fd``."""
    chunks = []
    while True:
        chunk = os.pread(fd, 1 << 20, sum(map(len, chunks)))
        if not chunk:
            break
        chunks.append(chunk)
    text = b"".join(chunks).decode(errors="replace")
    return {r[0] for r in csv.reader(io.StringIO(text)) if r and r[0] != COLUMNS[0]}


def append_once(path: str | os.PathLike, fields: Sequence[str], known: set[str]) -> None:
    """Appends one row unless its source is listed already (in ``known`` or in the file, which
    other processes may have written: they take turns under a lock); writes the header into
    an empty file. ``known`` is updated with what the file lists."""
    if fields[0] in known:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:  # data-loader workers are processes: one at a time reads, then appends
            fcntl.flock(fd, fcntl.LOCK_EX)
        known |= _sources(fd)
        if fields[0] not in known:
            header = _line(COLUMNS) if os.fstat(fd).st_size == 0 else b""
            os.write(fd, header + _line(fields))  # one append: rows from many workers never interleave
            known.add(fields[0])
    finally:
        os.close(fd)  # releases the lock
