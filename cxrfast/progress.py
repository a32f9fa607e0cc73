"""Progress bars that stay readable in log files: a tqdm bar on a terminal, plain lines
elsewhere (a log file, a pipe, a batch scheduler), so no job fills a log with carriage
returns. Used by preparation, training and inference alike."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm

PROGRESS_SECONDS_ENV = "CXRFAST_PROGRESS_SECONDS"  # seconds between plain progress lines (default 30)


class PlainProgress:
    """The progress bar's stand-in when its stream is not a terminal (a log file, a pipe,
    a batch scheduler): a plain line at most every ``interval`` seconds and one at the end,
    never a carriage return. It takes the calls the training loop makes on a tqdm bar."""

    def __init__(self, total: int | None, initial: int, desc: str, file=None, interval: float = 30.0, unit: str = "step",
                 delay: float = 0.0):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.delay = delay  # a job done within this many seconds prints no closing line
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._printed_at = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def write(self, text: str, file=None) -> None:
        print(text, file=file if file is not None else sys.stdout, flush=True)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed and self.n != self._printed_at and time.monotonic() - self._start >= self.delay:
            self._line()
        self._closed = True

    def _line(self) -> None:
        elapsed = int(time.monotonic() - self._start)
        done = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)  # None: a count without an end
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.unit} {count}{done}, {elapsed // 60}:{elapsed % 60:02d} elapsed{extra}",
              file=self.file, flush=True)
        self._last, self._printed_at = time.monotonic(), self.n


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress(total: int | None, initial: int, enabled: bool, desc: str, file=None, unit: str = "step",
             delay: float = 0.0) -> tqdm | PlainProgress:
    """A bar over optimizer steps (or ``unit``s; ``total`` None: a count with no end known); the
    caller adds img/s and loss as postfix. Written to
    ``file`` (stderr); where that is not a terminal, plain lines (:class:`PlainProgress`,
    every $CXRFAST_PROGRESS_SECONDS, default 30) instead of a bar redrawn with carriage returns.
    ``delay``: nothing shown for work that ends within that many seconds."""
    file = file if file is not None else sys.stderr
    if enabled and not _is_terminal(file):
        seconds = os.environ.get(PROGRESS_SECONDS_ENV, "")
        try:
            interval = float(seconds) if seconds else 30.0
        except ValueError:
            interval = 30.0
        return PlainProgress(total, initial, desc, file, interval, unit, delay)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit,
                dynamic_ncols=True, file=file, mininterval=0.5, delay=delay)


def show_rate(bar: tqdm | PlainProgress, done: int, started: float) -> None:
    """files/s since ``started`` (a ``time.perf_counter()``) beside the bar: this run's files
    only, not those a resumed run had done before."""
    elapsed = time.perf_counter() - started
    if elapsed > 0:
        bar.set_postfix(**{"files/s": f"{done / elapsed:.0f}"})
