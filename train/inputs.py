"""Checks of the input paths a user names (--data, --labels), made before anything is written.

Each problem is a :class:`train.config.UsageError` that names the option and the path, so
every job reports it as one ``error: ...`` line with exit code 2 and leaves no output folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from cxrfast.data import find_images, read_labels
from cxrfast.data.labels import LabelTable

from .config import UsageError


def image_files(data: str | os.PathLike, option: str = "--data") -> list[Path]:
    """The image files of a folder or of a CSV's path column; at least one."""
    path = Path(data)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such folder or file")
    try:
        files = find_images(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {exc}") from None  # the message names the path
    if not files:
        raise UsageError(f"{option} {path}: no image files (DICOM, PNG, JPEG) found there")
    return files


def label_table(labels: str | os.PathLike, label_format: str = "auto", uncertain: str = "ones",
                option: str = "--labels") -> LabelTable:
    """The label CSV, read and checked (columns, values); problems name the file."""
    path = Path(labels)
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        return read_labels(path, label_format, uncertain)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {exc}") from None
