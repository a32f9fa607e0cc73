"""Training checkpoints: atomic writes, the last K kept, exact resume.

A checkpoint holds the model, optimizer, grad scaler, position in the data (epoch, step in
epoch, global step), RNG states and the config. It is written to a temporary file, flushed
to disk and renamed, so a crash at any moment leaves either the old or the new file whole.
It holds only tensors and plain Python values, so it is read back with
``torch.load(weights_only=True)``: a file planted in the output folder cannot run code.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrfast.atomic import atomic_open
from cxrfast.models.checkpoints import CheckpointError, UnsafeCheckpointError, load_file

PATTERN = re.compile(r"checkpoint-(\d+)\.pth$")
REQUIRED = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng")

__all__ = ["CheckpointError", "UnsafeCheckpointError", "save_atomic", "list_checkpoints", "path_for", "save",
           "latest", "resolve", "load", "load_resume", "rng_to_saved", "rng_from_saved"]


DEMO_FINETUNED = Path("outputs") / "finetune_demo" / "best.pth"  # what `python -m train.finetune` writes


def given_or_demo(checkpoint: str | None) -> Path:
    """``--checkpoint``, or the demo fine-tuning result when none is given; a missing file is a
    UsageError naming it (and, for the demo, the commands that make it)."""
    from .config import UsageError

    path = Path(checkpoint) if checkpoint else DEMO_FINETUNED
    if not path.is_file():
        raise UsageError(f"--checkpoint {path}: no such file" + ("; run `python -m train.pretrain` and "
                         "`python -m train.finetune` first" if checkpoint is None else ""))
    return path


def save_atomic(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def list_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in Path(folder).glob("checkpoint-*.pth") if PATTERN.search(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.search(p.name).group(1)))


def path_for(folder: Path, step: int) -> Path:
    return Path(folder) / f"checkpoint-{step:08d}.pth"


def save(folder: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Writes checkpoint-<step>.pth and removes all but the newest ``keep_last``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = path_for(folder, step)
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
        raise CheckpointError(f"--resume {resume}: no checkpoint there")
    return path


def load(path: Path) -> dict[str, Any]:
    """A training checkpoint, read as data only; CheckpointError if unreadable or incomplete."""
    state = load_file(path)
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a cxrfast training checkpoint (no {', '.join(missing)})")
    return state


def load_resume(resume: str | None, folder: Path, warn: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) to resume from, or None to start afresh.

    With ``auto`` an unreadable newest checkpoint (truncated, garbage) is skipped with a
    warning for the previous one; a checkpoint refused as unsafe stops the run, since
    someone put it there.
    """
    if resume != "auto":
        path = resolve(resume, folder)
        return None if path is None else (path, load(path))
    found = list_checkpoints(folder)[::-1]
    for path in found:
        try:
            return path, load(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            if warn:
                print(f"warning: skipping {path}: {exc}; trying the previous checkpoint", file=sys.stderr, flush=True)
    if found:
        raise CheckpointError(f"--resume auto: none of the {len(found)} checkpoints in {folder} is readable")
    return None


def rng_to_saved(state: dict[str, Any]) -> dict[str, Any]:
    """runtime.rng_state() with numpy's key array as a tensor (weights_only has no numpy)."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def rng_from_saved(state: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}
