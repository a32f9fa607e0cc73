"""Training checkpoints: atomic writes, the last K kept, exact resume.

A checkpoint holds the model, optimizer, grad scaler, position in the data (epoch, step in
epoch, global step), RNG states and the config. It is written to a temporary file, flushed
to disk and renamed, so a crash at any moment leaves either the old or the new file whole.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from cxrfast.atomic import atomic_open

PATTERN = re.compile(r"checkpoint-(\d+)\.pth$")


def save_atomic(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def list_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in Path(folder).glob("checkpoint-*.pth") if PATTERN.search(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.search(p.name).group(1)))


def save(folder: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Writes checkpoint-<step>.pth and removes all but the newest ``keep_last``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{step:08d}.pth"
    save_atomic(state, path)
    for old in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def resolve(resume: str | None, folder: Path) -> Path | None:
    """``--resume``: a path, ``auto`` (the newest in the output folder, if any) or None."""
    if resume is None:
        return None
    if resume == "auto":
        return latest(folder)
    path = Path(resume)
    if path.is_dir():
        path = latest(path) or path
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there")
    return path


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
