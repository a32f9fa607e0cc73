"""What every cxrfast command line shares: one way to report a user mistake, and the checks
of the inputs a user names (image folders, label CSVs, split fractions).

``python -m cxrfast.prepare`` and the ``train`` jobs both use these, so the same mistake reads
the same everywhere: one ``error: ...`` line on stderr naming the value, exit code 2, no
traceback, raised before anything is written.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from .data.files import find_images
from .data.labels import LabelTable, Protocol, read_protocol
from .progress import PlainProgress, progress, show_rate


WALK_PROGRESS_DELAY = 2.0  # seconds a folder walk runs before its progress bar shows


class UsageError(Exception):
    """A user mistake (an option, a config file, an input path): reported as one line, exit 2."""


def fail(message: str) -> NoReturn:
    """Ends the process the way every user mistake ends: ``error: ...`` on stderr, exit code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``, exit 2), not usage + message."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(message)


def _where(option: str, path: Path) -> str:
    return f"{option} {path}" if option else str(path)


def image_files(data: str | os.PathLike, option: str = "--data", show_walk: bool = False) -> list[Path]:
    """The image files of a folder or of a CSV's path column; at least one, else a
    :class:`UsageError` naming ``option`` (empty for a positional argument) and the path.
    ``show_walk``: a progress bar (files found, files/s) while a folder is walked, which on
    network storage can take minutes for millions of files (none for a walk shorter than
    ``WALK_PROGRESS_DELAY`` seconds, so that a quick walk adds no line before an error)."""
    path = Path(data)
    if not path.exists():
        raise UsageError(f"{_where(option, path)}: no such folder or file")
    try:
        files = _walk_with_progress(path) if show_walk and path.is_dir() else find_images(path)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        message = " ".join(str(exc).split())  # names the path already
        raise UsageError(f"{option} {message}" if option else message) from None
    if not files:
        raise UsageError(f"{_where(option, path)}: no image files (DICOM, PNG, JPEG) found there")
    return files


def _walk_with_progress(folder: Path) -> list[Path]:
    """find_images over a folder with a bar of the files found so far."""
    with progress(None, 0, True, f"walk {folder}", unit="file", delay=WALK_PROGRESS_DELAY) as bar:
        started = time.perf_counter()

        def found(n: int) -> None:  # tqdm shows its own rate; plain lines get one here
            bar.update(n)
            if isinstance(bar, PlainProgress):
                show_rate(bar, bar.n, started)

        return find_images(folder, on_found=found)


def label_table(labels: str | os.PathLike, label_format: str = "auto", uncertain: str = "ones",
                option: str = "--labels", protocol: Protocol | None = None) -> LabelTable:
    """The label CSV, read and checked (columns, values) under ``protocol``; a problem is a
    :class:`UsageError` naming the file (and the columns found and expected) or the option."""
    return label_protocol(labels, label_format, uncertain, option, protocol)[0]


def label_protocol(labels: str | os.PathLike, label_format: str = "auto", uncertain: str = "ones",
                   option: str = "--labels", protocol: Protocol | None = None) -> tuple[LabelTable, list[str]]:
    """:func:`label_table` and the lines that count what the protocol left out (to print)."""
    protocol = protocol or Protocol()
    for what, path in [(option, Path(labels))] + ([("--test_labels", Path(protocol.test_labels))]
                                                   if protocol.test_labels else []):
        if not path.is_file():
            raise UsageError(f"{what} {path}: no such file")
    try:
        return read_protocol(labels, label_format, uncertain, protocol)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        message = " ".join(str(exc).split())
        if message.startswith("--"):  # names its option already (--uncertain, --label_set, ...)
            raise UsageError(message) from None
        if protocol.test_labels and str(protocol.test_labels) in message:
            raise UsageError(f"--test_labels {message}") from None
        path = Path(labels)
        raise UsageError(f"{option} {message}" if str(path) in message else f"{option} {path}: {message}") from None


def check_fractions(fractions: Sequence[float], option: str = "--split_fractions") -> tuple[float, float, float]:
    """Three finite, non-negative train,val,test fractions that sum to 1, else a UsageError."""
    fr = tuple(fractions)
    ok = len(fr) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                              and x >= 0 for x in fr)
    if not ok or abs(sum(fr) - 1.0) > 1e-6:
        raise UsageError(f"{option} {','.join(map(str, fr))}: needs three non-negative fractions "
                         "(train,val,test) that sum to 1")
    return fr  # type: ignore[return-value]
