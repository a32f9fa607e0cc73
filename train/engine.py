"""The one training loop that pretraining and fine-tuning share.

It owns what every job needs: the resumable sharded sampler, AdamW with per-group lr scale,
warmup + cosine lr per iteration, gradient accumulation, DDP and torch.compile, bf16
autocast on CUDA, the non-finite-loss guard, atomic checkpoints with exact resume (model,
optimizer, data position, RNG states, job state), the progress bar, JSONL and TensorBoard
logs, and a final check that every rank holds the same parameters.

The pieces: :func:`restore` (resume), :func:`make_optimizer`, :func:`train_step` (the step
itself, free of host syncs), :class:`Loop` (the epoch loop: check steps, logs, checkpoints,
epoch ends) and :func:`run`, which strings them together.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from cxrfast import atomic
from cxrfast.data import ResumableSampler
from cxrfast.data.loaders import BACKENDS
from cxrfast.data.shards import collate
from cxrfast.models import PRESETS

from . import checkpoints, config, logs, runtime, schedule
from .config import opt


@dataclass
class LoopConfig:
    output_dir: str = opt("outputs/run", "where checkpoints, logs and pictures go")
    epochs: int = opt(100, "training epochs", minimum=1)
    warmup_epochs: float = opt(5, "linear warmup epochs", minimum=0)
    batch_size: int = opt(64, "images per GPU (or process) per micro-batch", minimum=1)
    accum_iter: int = opt(1, "micro-batches per optimizer step (gradient accumulation)", minimum=1)
    blr: float = opt(1e-3, "base learning rate: lr = blr * effective batch / 256", minimum=0)
    lr: Optional[float] = opt(None, "absolute learning rate (overrides blr)", minimum=0)
    min_lr: float = opt(0.0, "learning rate at the end of the cosine decay", minimum=0)
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms, tokens)", minimum=0)
    betas: tuple[float, ...] = opt((0.9, 0.999), "AdamW betas")
    clip_grad: Optional[float] = opt(None, "clip the gradient norm to this value", minimum=0)
    num_workers: int = opt(4, "data loader worker processes per rank (image files; prepared shards are read "
                                  "in-process by native threads)", minimum=0)
    seed: int = opt(0, "random seed")
    save_every: int = opt(1000, "write a checkpoint every N optimizer steps (and at each epoch end and the end)",
                          minimum=1)
    keep_last: int = opt(3, "checkpoints to keep", minimum=1)
    log_every: int = opt(10, "log metrics every N optimizer steps", minimum=1)
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps in total", minimum=1)
    resume: Optional[str] = opt(None, "checkpoint to resume from, or 'auto' for the newest in output_dir")
    compile: bool = opt(False, "torch.compile the model")
    device: str = opt("auto", "cuda, cpu or auto", choices=runtime.DEVICES)


@dataclass
class ImageConfig(LoopConfig):
    model: str = opt("vit_base", "encoder preset: vit_tiny, vit_small, vit_base, vit_large, vit_huge",
                     choices=sorted(PRESETS))
    img_size: int = opt(224, "input size (a multiple of the patch size; 448 and 512 suit CXR)", minimum=1)
    in_chans: int = opt(1, "input channels (1 for grey CXR, 3 to match RGB checkpoints)", minimum=1)
    crop_scale: tuple[float, ...] = opt((0.2, 1.0), "random resized crop area range", minimum=0, maximum=1)
    decode_size: Optional[int] = opt(None, "decode files with this longer side before cropping (default 2 x img_size)",
                                     minimum=1)
    loader: str = opt("auto", "for prepared shards: dali, torch (GPU tensors), cpu, or auto (DALI, then torch "
                              "on GPU, else cpu); files are always decoded by the CPU DataLoader", choices=BACKENDS)
    allow_mismatch: bool = opt(False, "load a pretrained checkpoint even when tensors other than the head do not "
                                      "fit the model (they stay at their initialisation)")

    def validate(self) -> None:
        check_patch(self.model, self.img_size)


def check_patch(model: str, img_size: int) -> None:
    """The image must tile into whole patches of the preset."""
    patch = PRESETS[model].patch_size
    if img_size % patch:
        raise config.UsageError(f"--img_size {img_size}: not a multiple of {model}'s patch size {patch}")


class NonFiniteLoss(RuntimeError):
    """Raised on every rank when the loss on any rank, or the parameters about to be saved,
    are NaN or infinite; the last good checkpoint is left as it was."""


FAULT_ENV = "CXRFAST_TEST_NAN_LOSS"  # "RANK:STEP": that rank's loss turns NaN at that step (tests only)


def _injected_fault(rank: int) -> int | None:
    """The optimizer step at which this rank's loss is made NaN, from FAULT_ENV."""
    value = os.environ.get(FAULT_ENV, "")
    if ":" not in value:
        return None
    r, step = value.split(":", 1)
    return int(step) if int(r) == rank else None


def _on_any_rank(flag: torch.Tensor, rt: runtime.Runtime) -> bool:
    """True on every rank when ``flag`` (a 0/1 int tensor on the device) is set on any rank."""
    if rt.distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # one tiny collective
    return bool(flag.item())  # host sync: the stop decision is taken on the host (check steps only)


def params_not_finite(model: torch.nn.Module) -> torch.Tensor:
    """1 (int32, on the parameters' device) when some parameter is NaN/inf or exploded.

    One fused norm over all parameters: NaN/inf propagate into it, and parameters beyond
    ~1e19 (an exploding step, e.g. lr 1e30) overflow its fp32 square to inf. No host sync here.
    """
    params = [p.detach() for p in model.parameters()]
    norm = torch.nn.utils.get_total_norm(params, norm_type=2.0, foreach=True)
    return (~torch.isfinite(norm)).to(torch.int32)


def require_finite(model: torch.nn.Module, rt: runtime.Runtime, what: str) -> None:
    """Raises NonFiniteLoss on every rank (``what`` is its message) when any rank's parameters
    are not finite, so nothing is validated or saved from an exploded model."""
    if _on_any_rank(params_not_finite(model), rt):  # host sync: once per checkpoint or epoch end
        raise NonFiniteLoss(what)


def last_good_text(path: Path | None) -> str:
    if path is None:
        return "No checkpoint has been written yet, so there is nothing to resume from"
    return f"The last good checkpoint is {path} (resume with --resume {path})"


@dataclass
class Job:
    """What a job plugs into the loop."""

    kind: str
    model: torch.nn.Module
    dataset: Dataset
    param_groups: list[dict]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]  # (net, batch on device) -> scalar loss
    on_epoch_end: Callable[[int, int], dict] = lambda epoch, step: {}  # (epoch, step) -> metrics to log
    job_state: Callable[[], dict] = dict  # extra state for checkpoints (e.g. best metric)
    load_job_state: Callable[[dict], None] = lambda state: None
    batches: Optional[Callable[[ResumableSampler], Any]] = None  # a GPU loader; None: a DataLoader over dataset
    loader: str = ""  # the loader's name in the data-wait warning (default: the DataLoader's description)


def launch(cfg: LoopConfig, body: Callable[[runtime.Runtime], dict]) -> dict:
    """Runs a job in its process group; a non-finite loss exits with code 3 and a message."""
    rt = runtime.setup(cfg.device)
    try:
        return body(rt)
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        runtime.teardown()


Resumed = tuple[Path, dict]  # (checkpoint path, its training state)


def read_resume(cfg: LoopConfig, rt: runtime.Runtime) -> Resumed | None:
    """Reads ``--resume`` (a path or ``auto``) before :func:`start` writes anything, so a bad
    path ends in one error line with the output folder (and an existing config.json) untouched."""
    return checkpoints.load_resume(cfg.resume, Path(cfg.output_dir), warn=rt.main)


def check_batch(images: int, cfg: LoopConfig, world_size: int) -> None:
    """One optimizer step needs batch x accum images on each rank (the sampler gives each rank
    ceil(images / world_size)); checked before :func:`start`, as a usage error."""
    per_rank = -(-images // world_size)
    if per_rank < cfg.batch_size * cfg.accum_iter:
        raise config.UsageError(f"--batch_size {cfg.batch_size} --accum_iter {cfg.accum_iter}: {images} images are "
                                f"too few for batch {cfg.batch_size} x accum {cfg.accum_iter} x {world_size} processes")


def start(cfg: LoopConfig, rt: runtime.Runtime) -> Path:
    """The output folder (made, with the resolved config, by rank 0) and per-rank seeding.

    Call it only once every input (data, --init, --resume, batch size) is known to be good."""
    out = Path(cfg.output_dir)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / "config.json")
    runtime.seed_everything(cfg.seed + rt.rank)
    return out


def prepared_input(cfg: ImageConfig, prepared, rt: runtime.Runtime, with_labels: bool):
    """(dataset, backend name, GPU batch factory or None) for training on prepared shards."""
    from cxrfast.data import loaders
    from cxrfast.data.shards import PreparedDataset

    dataset = PreparedDataset(prepared, img_size=cfg.img_size, in_chans=cfg.in_chans, train=True,
                              crop_scale=tuple(cfg.crop_scale), seed=cfg.seed, with_labels=with_labels)
    backend = loaders.choose(cfg.loader, rt.device)
    batches = loaders.batch_factory(backend, prepared, batch_size=cfg.batch_size, img_size=cfg.img_size, train=True,
                                    crop_scale=tuple(cfg.crop_scale), seed=cfg.seed, device=rt.device,
                                    in_chans=cfg.in_chans, with_labels=with_labels, num_workers=cfg.num_workers)
    return dataset, backend, batches


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


NO_BAD = 2 ** 62  # Guard.first_bad when every step so far was finite


class Guard:
    """The non-finite guard, kept on the device so the step never waits for the host (like
    GradScaler's ``found_inf``). Each step it makes the optimizer's skip flag (1.0 when the
    step's loss or gradients were NaN/inf on any rank: the update is skipped), records the
    first such step and keeps the last micro-batch's loss for the log. The host reads it only
    at check steps (logging steps, checkpoint steps, epoch ends): a run stops there, at most
    ``log_every - 1`` steps after the bad one, and nothing is written in between."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), NO_BAD, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), device=device)  # the first bad step's loss (finite: its gradients were bad)
        self.loss = torch.full((), float("nan"), device=device)
        self._step_loss = torch.zeros((), device=device)  # this step's first non-finite loss, else its last loss

    def record(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss."""
        loss = loss.detach().float()
        self._step_loss = torch.where(torch.isfinite(self._step_loss), loss, self._step_loss)
        self.loss = loss

    def found_inf(self, grad_norm: torch.Tensor, step: int, rt: runtime.Runtime) -> torch.Tensor:
        """The step's skip flag for fused AdamW's ``found_inf``: a float32 0-dim tensor, exactly
        1.0 (the kernels test ``== 1``) when a loss of this step or the total gradient norm
        (taken before any clipping) is not finite on any rank, else 0.0; gradients beyond
        ~1e19 overflow the norm's fp32 squares, so an exploding step is skipped too. No host sync."""
        bad = (~torch.isfinite(self._step_loss) | ~torch.isfinite(grad_norm)).to(torch.float32)
        if rt.distributed:  # a device collective, not a host sync: every rank skips the same steps
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        new = (bad == 1) & (self.first_bad == NO_BAD)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_loss = torch.where(new, self._step_loss, self.bad_loss)
        self._step_loss = torch.zeros_like(self._step_loss)
        return bad

    def first_bad_step(self, rt: runtime.Runtime) -> int | None:
        """The first step whose loss or gradients were not finite on any rank (every rank gets
        the same answer)."""
        first = self.first_bad.clone()
        if rt.distributed:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)  # check steps only
        step = int(first.item())  # host sync: check steps only
        return None if step == NO_BAD else step


def make_optimizer(cfg: LoopConfig, rt: runtime.Runtime, job: Job) -> tuple[torch.optim.Optimizer, float]:
    """AdamW over the job's parameter groups and the base lr. Fused on CPU too: the unfused
    step reads its step counters with ``.item()``, the fused one keeps them in tensors, and
    only the fused one honours ``found_inf`` (the skip flag :func:`train_step` sets; the
    foreach and single-tensor steps reject it)."""
    base_lr = schedule.effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, rt.world_size)
    return torch.optim.AdamW(job.param_groups, lr=base_lr, betas=tuple(cfg.betas), fused=True), base_lr


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def restore(resumed: Resumed | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: Job,
            rt: runtime.Runtime) -> tuple[Position, Path | None]:
    """Loads model, optimizer, RNG and job state from ``resumed``; the position to go on from."""
    if resumed is None:
        return Position(), None
    path, state = resumed
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rngs = state["rng"]
    runtime.set_rng_state(checkpoints.rng_from_saved(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0]))
    job.load_job_state(state.get("job", {}))
    pos = Position(state["epoch"], state["step_in_epoch"], state["global_step"])
    logs.announce(f"resumed from {path} at epoch {pos.epoch}, step {pos.global_step}", rt.main)
    return pos, path


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, next_batch: Callable[[], Any],
               loss_fn: Callable, guard: Guard, *, step: int, lr: float, cfg: LoopConfig, rt: runtime.Runtime,
               poison: bool = False) -> None:
    """The training step: ``cfg.accum_iter`` micro-batches, then one optimizer step.

    It makes no device-to-host sync. A step whose loss or gradients are NaN/inf on any rank
    is skipped on the device: fused AdamW reads ``optimizer.found_inf`` (1.0: parameters,
    moments and the step count stay as they were), and ``guard`` records the step for the
    check steps. ``step`` is the optimizer step being made (1-based); ``poison`` turns its
    loss NaN (the tests' fault injection).
    """
    for micro in range(cfg.accum_iter):
        batch = _to_device(next_batch(), rt.device)
        last = micro == cfg.accum_iter - 1
        with contextlib.nullcontext() if last or not rt.distributed else net.no_sync():
            with runtime.autocast(rt.device):
                loss = loss_fn(net, batch)
            if poison:
                loss = loss * float("nan")
            guard.record(loss)
            (loss / cfg.accum_iter).backward()
    # the lr schedule advances on a skipped step too (it follows the step number, as it would
    # after a GradScaler skip), so a run resumed later sees the same lr at the same step
    schedule.apply(optimizer, lr)
    optimizer.found_inf = guard.found_inf(grad_norm(net, cfg.clip_grad), step, rt)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def grad_norm(net: torch.nn.Module, clip: float | None) -> torch.Tensor:
    """The total gradient norm (0-dim, on the device), clipping to ``clip`` when set. The norm
    is the unclipped one that clip_grad_norm_ returns: clipping keeps NaN gradients NaN, but
    an inf norm scales every gradient by 0, so the finite ones (whole tensors of them) become
    zeros, and only that norm still tells the step was bad. No host sync
    (``error_if_nonfinite`` off)."""
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)


class Loop:
    """The epoch loop around :func:`train_step`: checks, logs, checkpoints, epoch ends."""

    def __init__(self, cfg: LoopConfig, rt: runtime.Runtime, job: Job, resumed: Resumed | None):
        self.cfg, self.rt, self.job, self.model = cfg, rt, job, job.model
        self.out = Path(cfg.output_dir)
        self.sampler = ResumableSampler(len(job.dataset), rank=rt.rank, world_size=rt.world_size, seed=cfg.seed)
        self.per_step = cfg.batch_size * cfg.accum_iter
        self.steps_per_epoch = self.sampler.per_rank // self.per_step
        self.optimizer, self.base_lr = make_optimizer(cfg, rt, job)
        self.pos, resume_path = restore(resumed, self.model, self.optimizer, job, rt)
        self.good = resume_path  # the newest checkpoint known to hold finite parameters, on every rank
        self.net = DistributedDataParallel(self.model) if rt.distributed else self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.log = logs.MetricsLog(self.out, enabled=rt.main,
                                   resume_step=self.pos.global_step if resume_path is not None else None)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.bar = logs.progress(self.total_steps, self.pos.global_step, rt.main, job.kind)
        self.guard = Guard(rt.device)
        self.workers = 0 if getattr(job.dataset, "in_process", False) else cfg.num_workers
        name = job.loader or (f"torch DataLoader over {type(job.dataset).__name__}, {self.workers} worker processes"
                              if job.batches is None else "the job's batches")
        self.wait = logs.DataWait(rt.device, name)
        self.peak = logs.peak_flops(rt.device)
        self.flops = logs.train_flops(self.model) if self.peak else None
        self.fault_step = _injected_fault(rt.rank)
        self.last_path: Path | None = None
        self.logged_at, self.t_last, self.seen = self.pos.global_step, time.perf_counter(), 0

    def loader(self):
        if self.job.batches is not None:
            return self.job.batches(self.sampler)
        # prepared shards are cropped by native threads in this process (workers would only add
        # shared-memory copies); image files are decoded in worker processes
        return DataLoader(self.job.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          num_workers=self.workers, collate_fn=collate, drop_last=True,
                          pin_memory=self.rt.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed))  # leaves the global RNG untouched

    def run_epoch(self) -> None:
        """The rest of the current epoch: its training steps, then (if reached) its end."""
        pos, cfg = self.pos, self.cfg
        self.sampler.set_epoch(pos.epoch, start=pos.step_in_epoch * self.per_step)
        if pos.step_in_epoch < self.steps_per_epoch:  # else a checkpoint from before an epoch end (older cxrfast)
            batches = iter(self.loader())
            self.net.train()
            while pos.step_in_epoch < self.steps_per_epoch and pos.global_step < self.total_steps:
                lr = schedule.lr_at(pos.epoch + pos.step_in_epoch / self.steps_per_epoch, self.base_lr, cfg.min_lr,
                                    cfg.warmup_epochs, cfg.epochs)
                train_step(self.net, self.optimizer, lambda: self.wait.fetch(batches), self.job.loss, self.guard,
                           step=pos.global_step + 1, lr=lr, cfg=cfg, rt=self.rt,
                           poison=self.fault_step == pos.global_step + 1)
                pos.global_step += 1
                pos.step_in_epoch += 1
                self.seen += self.per_step
                self.bar.update(1)
                self.after_step(lr)
            del batches
        if pos.step_in_epoch >= self.steps_per_epoch:
            self.end_epoch()

    def after_step(self, lr: float) -> None:
        """Check steps (logging, checkpoint, epoch end) read the guard; nothing else syncs."""
        step, cfg = self.pos.global_step, self.cfg
        log_now = step % cfg.log_every == 0 or step == self.total_steps
        epoch_end = self.pos.step_in_epoch >= self.steps_per_epoch  # end_epoch writes this step's checkpoint
        save_now = not epoch_end and (step % cfg.save_every == 0 or step == self.total_steps)
        if log_now or save_now or epoch_end:
            self.check_loss()
        if log_now:
            self.log_step(lr)
        if save_now:
            self.last_path = self.checkpoint()

    def check_loss(self) -> None:
        """Stops every rank together when a step since the last check had a non-finite loss
        or gradients (its update was skipped, so the parameters are still those before it)."""
        bad = self.guard.first_bad_step(self.rt)
        if bad is None:
            return
        self.bar.close()  # the error then starts on its own line
        raise NonFiniteLoss(f"{self.bad_what()} at step {bad} (epoch {self.pos.epoch}), so its update was skipped; "
                            f"stopping. {last_good_text(self.good)}; try a lower lr or --clip_grad.")

    def bad_what(self) -> str:
        """What went non-finite at the guard's first bad step, for the error line."""
        if self.rt.distributed:
            return f"the loss or the gradients are not finite on at least one of {self.rt.world_size} ranks"
        loss = self.guard.bad_loss.item()  # host sync: only on the way to stopping
        return f"loss is {loss}" if not math.isfinite(loss) else f"gradients are not finite (loss {loss:.4g})"

    def log_step(self, lr: float) -> None:
        step = self.pos.global_step
        mean_loss = runtime.mean_across_ranks(self.guard.loss.clone()).item()  # host sync: logging steps only
        timing = self.wait.window(step - self.logged_at)
        now = time.perf_counter()
        ips = self.seen * self.rt.world_size / (now - self.t_last)
        extra = {}
        if self.flops:  # per rank: its images times the FLOPs per image, against its card's peak
            extra["mfu"] = round(self.seen * self.flops / (now - self.t_last) / self.peak, 4)
        warning = self.wait.warning(timing, self.logged_at + 1, step) if self.rt.main else None
        self.logged_at, self.t_last, self.seen = step, now, 0
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=logs.significant(ips), lr=f"{lr:.2e}",
                             wait=f"{100 * timing['data_wait_frac']:.0f}%", **{k: f"{v:.1%}" for k, v in extra.items()})
        if warning:
            self.bar.write(warning, file=sys.stderr)
        self.log.write(step, epoch=self.pos.epoch, loss=mean_loss, lr=lr, images_per_s=float(logs.significant(ips, 4)),
                       **timing, **extra)

    def ensure_finite(self) -> None:
        """Stops every rank before anything (validation, best.pth, a checkpoint) uses exploded parameters."""
        try:
            require_finite(self.model, self.rt, f"parameters are not finite after step {self.pos.global_step} "
                                                 f"(epoch {self.pos.epoch}): the update exploded, so nothing was "
                                                 f"saved from it. {last_good_text(self.good)}; try a lower lr or "
                                                 "--clip_grad.")
        except NonFiniteLoss:
            self.bar.close()
            raise

    def checkpoint(self, checked: bool = False) -> Path:
        """Writes a checkpoint (rank 0) unless the parameters went non-finite; every rank calls it."""
        if not checked:
            self.ensure_finite()
        rngs = [runtime.rng_state()]
        if self.rt.distributed:  # every rank joins the gather; only rank 0 writes
            rngs = [None] * self.rt.world_size
            torch.distributed.all_gather_object(rngs, runtime.rng_state())
        pos = self.pos
        self.good = checkpoints.path_for(self.out, pos.global_step)
        if not self.rt.main:
            return self.good
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": pos.epoch,
                 "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step,
                 "rng": [checkpoints.rng_to_saved(r) for r in rngs], "job": self.job.job_state(),
                 "config": config.to_dict(self.cfg), "kind": self.job.kind}
        path = checkpoints.save(self.out, pos.global_step, state, self.cfg.keep_last)
        config.save(self.cfg, self.out / "config.json")
        return path

    def end_epoch(self) -> None:
        self.ensure_finite()  # validation and best.pth never see exploded parameters
        self.pos.epoch += 1
        self.pos.step_in_epoch = 0
        metrics = self.job.on_epoch_end(self.pos.epoch, self.pos.global_step)
        if metrics:
            self.log.write(self.pos.global_step, epoch=self.pos.epoch, **metrics)
            if self.rt.main:  # one line per epoch, above the bar (e.g. fine-tuning's validation AUROC)
                self.bar.write(logs.epoch_line(self.pos.epoch, self.cfg.epochs, metrics))
        # every epoch end is a resume point, written after its validation and best.pth with the
        # position of the next epoch, so a resume never repeats the epoch end
        self.last_path = self.checkpoint(checked=True)  # validation does not change the parameters


def run(cfg: LoopConfig, rt: runtime.Runtime, job: Job, resumed: Resumed | None) -> dict:
    """Trains ``job`` from the start or from ``resumed`` (:func:`read_resume`); returns the summary."""
    check_batch(len(job.dataset), cfg, rt.world_size)  # the job checked it before start; kept for other callers
    loop = Loop(cfg, rt, job, resumed)
    del resumed
    while loop.pos.epoch < cfg.epochs and loop.pos.global_step < loop.total_steps:
        loop.run_epoch()
    loop.bar.close()
    out, last_path = loop.out, loop.last_path
    if last_path is None and rt.main:
        last_path = checkpoints.latest(out)
    agree, sums = runtime.checksums_agree(job.model)
    summary = {"steps": loop.pos.global_step, "epochs_done": loop.pos.epoch,
               "final_loss": loop.guard.loss.item(),  # host sync, once at the end
               "checkpoint": str(last_path) if last_path else None, "world_size": rt.world_size,
               "ranks_agree": agree, "param_checksums": sums}
    if rt.main:
        atomic.write_text(out / "summary.json", json.dumps(summary, indent=2))
        loop.log.close()
    if not agree:
        raise RuntimeError(f"ranks disagree after training: parameter checksums {sums}")
    return summary
