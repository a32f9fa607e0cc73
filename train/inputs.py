"""Checks of the input paths a user names (--data, --labels), made before anything is written.

They live in :mod:`cxrfast.cli`, shared with ``python -m cxrfast.prepare``; each problem is a
:class:`cxrfast.cli.UsageError` (``train.config.UsageError``) naming the option and the path,
so every job reports it as one ``error: ...`` line with exit code 2 and leaves no output folder.
"""
from __future__ import annotations

from cxrfast.cli import check_fractions, image_files, label_table

__all__ = ["check_fractions", "image_files", "label_table"]
