"""What a person reads during and after a run: a progress bar, a JSONL log, TensorBoard."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from cxrfast.progress import PROGRESS_SECONDS_ENV, PlainProgress, progress  # noqa: F401 (the loops call logs.progress)

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
        """One JSONL record; numbers become TensorBoard scalars and a :class:`Path` to a PNG
        (a picture the job wrote) a TensorBoard image, recorded in the JSONL as its path."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3),
                  **{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, Path) and v.suffix.lower() == ".png":
                    self.image(k, v, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        """A PNG file as a TensorBoard image (grey or colour); an unreadable one is reported, not raised."""
        if self.tb is None:
            return
        try:
            from PIL import Image

            with Image.open(png) as img:
                pixels = np.asarray(img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB"))
        except OSError as exc:  # a picture must never stop a run
            print(f"warning: {png} not shown in TensorBoard: {exc}", file=sys.stderr)
            return
        self.tb.add_image(tag, pixels, step, dataformats="HW" if pixels.ndim == 2 else "HWC")

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


def significant(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without an exponent for the values a rate takes
    (1234.4 -> '1234', 12.345 -> '12.3', 0.01234 -> '0.0123')."""
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    if abs(x) >= 10 ** (digits - 1) - 0.5:  # whole numbers keep all their digits: 1235 img/s, not 1230
        return f"{x:.0f}"
    x = float(f"{x:.{digits}g}")  # rounded first, so 9.996 becomes 10.0, not 10.00
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    return f"{x:.{decimals}f}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) and abs(v) >= 1e-3 else f"{v:.3g}"
    return str(v)


def epoch_line(epoch: int, epochs: int, metrics: dict[str, Any]) -> str:
    """The one line printed at an epoch end: what the job measured (e.g. validation AUROC)."""
    return f"epoch {epoch}/{epochs}: " + ", ".join(f"{k} {_value(v)}" for k, v in metrics.items())


def announce(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


WAIT_WARN = 0.05  # warn when the loader holds the device back more than this fraction of the time


class DataWait:
    """How long the training step waits for its data, measured between logging steps.

    ``fetch`` wraps each ``next(batches)``: host time blocked in it is the wait on CPU. On
    CUDA the host runs ahead of the GPU, so a host wait is idle GPU time only when the GPU
    queue ran dry: there the wait is the gap between a CUDA event recorded before the fetch
    and one recorded after it, read (a host sync) only in :meth:`window`, at logging steps.
    """

    def __init__(self, device: torch.device, loader: str):
        self.cuda = device.type == "cuda"
        self.loader = loader
        self.warned = False
        self._host = 0.0
        self._events: list = []
        self._start = time.perf_counter()

    def fetch(self, batches: Iterator) -> Any:
        """next(batches), timed; StopIteration passes through."""
        if self.cuda:
            before = torch.cuda.Event(enable_timing=True)
            before.record()
        t = time.perf_counter()
        try:
            return next(batches)
        finally:
            self._host += time.perf_counter() - t
            if self.cuda:
                after = torch.cuda.Event(enable_timing=True)
                after.record()
                self._events.append((before, after))

    def window(self, steps: int) -> dict:
        """Per-step wall and wait time (ms) since the last call, and the wait's fraction."""
        if self.cuda:
            torch.cuda.synchronize()  # host sync: a logging step; every event is then complete
        now = time.perf_counter()  # after the sync, so the window holds the device work it queued
        wall = now - self._start
        if self.cuda:
            wait = sum(b.elapsed_time(a) for b, a in self._events) / 1000
        else:
            wait = self._host
        self._host, self._events, self._start = 0.0, [], now
        steps = max(steps, 1)
        return {"step_ms": round(1000 * wall / steps, 2), "data_wait_ms": round(1000 * wait / steps, 2),
                "data_wait_frac": round(wait / wall, 4) if wall > 0 else 0.0}

    def warning(self, timing: dict, first: int, last: int) -> str | None:
        """The one warning (given once per run) when the loader held the step back > 5%."""
        if self.warned or timing["data_wait_frac"] <= WAIT_WARN:
            return None
        self.warned = True
        return (f"warning: the data loader ({self.loader}) held the {'GPU' if self.cuda else 'device'} back "
                f"{100 * timing['data_wait_frac']:.0f}% of the time in steps {first}-{last} (more than "
                f"{100 * WAIT_WARN:.0f}%); use prepared shards with --loader dali or torch, or more --num_workers")


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by a pattern
# of torch.cuda.get_device_name(); the first match wins, so the variants come before the family
# name ("NVIDIA H100 80GB HBM3" is the SXM card). Word boundaries keep A10 off A100 and A10G.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.4),
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bG?H200\b", 989.4),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.2),
)


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the card called ``name``; None when it is not known."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops
    return None


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, from its name; None off CUDA or for an unknown card."""
    if device.type != "cuda":
        return None
    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def blocks_flops(tokens: int, dim: int, depth: int, mlp_hidden: int) -> int:
    """Forward matmul FLOPs of ``depth`` ViT blocks on ``tokens`` tokens of width ``dim``:
    qkv, projection and the two MLP layers (2 FLOPs per multiply-add), plus attention's QK^T
    and AV (4 T^2 D). LayerNorm, softmax, GELU and adds are left out, as flop counters do."""
    per_block = 2 * tokens * dim * (4 * dim + 2 * mlp_hidden) + 4 * tokens * tokens * dim
    return depth * per_block


def embedded_patches(model: torch.nn.Module) -> int:
    """Patches per image the patch embedding multiplies: the MAE embeds its visible ones only."""
    n = model.patch_embed.num_patches
    return int(n * (1 - model.mask_ratio)) if hasattr(model, "decoder_blocks") else n


def patch_flops(model: torch.nn.Module) -> int:
    """Forward FLOPs per image of the patch embedding."""
    pe = model.patch_embed
    return 2 * embedded_patches(model) * pe.proj.in_channels * pe.patch_size ** 2 * pe.proj.out_channels


def forward_flops(model: torch.nn.Module) -> int:
    """Forward FLOPs per image of an MAE or a classifier, from its configuration (one ViT formula)."""
    pe = model.patch_embed
    n, dim = pe.num_patches, pe.proj.out_channels
    hidden = model.blocks[0].mlp.fc1.out_features
    flops = patch_flops(model)
    if hasattr(model, "decoder_blocks"):  # MAE: encoder on the visible patches, decoder on all
        visible = embedded_patches(model) + 1
        ddim = model.decoder_embed.out_features
        flops += blocks_flops(visible, dim, len(model.blocks), hidden) + 2 * visible * dim * ddim
        flops += blocks_flops(n + 1, ddim, len(model.decoder_blocks), model.decoder_blocks[0].mlp.fc1.out_features)
        return flops + 2 * (n + 1) * ddim * model.decoder_pred.out_features
    return flops + blocks_flops(n + 1, dim, len(model.blocks), hidden) + 2 * dim * model.head.out_features


def train_flops(model: torch.nn.Module) -> int:
    """FLOPs per image of one training step: the forward, and a backward of twice that, less
    the patch embedding's input gradient (the image needs none)."""
    return 3 * forward_flops(model) - patch_flops(model)
