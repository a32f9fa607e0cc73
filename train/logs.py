"""What a person reads during and after a run: a progress bar, a JSONL log, TensorBoard."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cxrfast import atomic


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

    Only the main rank writes; other ranks get a no-op log. A run resumed at ``resume_step``
    first drops what the killed run logged after that step (both logs), so no step repeats.
    """

    def __init__(self, folder: Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.tb = None
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_jsonl(self.path, resume_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: readers drop events at steps >= it that earlier runs wrote
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency, but a log must never stop a run
                print("tensorboard not installed: writing metrics.jsonl only", file=sys.stderr)

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the records with step <= last_step (and drops a line torn by a kill), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line + "\n")
    atomic.write_text(path, "".join(kept))


def progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    """A bar over optimizer steps; the caller adds img/s and loss as postfix."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5)


def announce(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
