"""The one training loop that pretraining and fine-tuning share.

It owns what every job needs: the resumable sharded sampler, AdamW with per-group lr scale,
warmup + cosine lr per iteration, gradient accumulation, DDP and torch.compile, bf16
autocast on CUDA, the non-finite-loss guard, atomic checkpoints with exact resume (model,
optimizer, data position, RNG states, job state), the progress bar, JSONL and TensorBoard
logs, and a final check that every rank holds the same parameters.
"""
from __future__ import annotations

import contextlib
import json
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
    return bool(flag.item())  # host-device sync: the stop decision is taken on the host


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


def launch(cfg: LoopConfig, body: Callable[[runtime.Runtime], dict]) -> dict:
    """Runs a job in its process group; a non-finite loss exits with code 3 and a message."""
    rt = runtime.setup(cfg.device)
    try:
        return body(rt)
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    except checkpoints.CheckpointError as exc:  # unreadable, unsafe or ill-fitting checkpoint
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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


def run(cfg: LoopConfig, rt: runtime.Runtime, job: Job, resumed: Resumed | None) -> dict:
    """Trains ``job`` from the start or from ``resumed`` (:func:`read_resume`); returns the summary."""
    out = Path(cfg.output_dir)
    check_batch(len(job.dataset), cfg, rt.world_size)  # the job checked it before start; kept for other callers
    sampler = ResumableSampler(len(job.dataset), rank=rt.rank, world_size=rt.world_size, seed=cfg.seed)
    per_step = cfg.batch_size * cfg.accum_iter
    steps_per_epoch = len(sampler.indices()) // per_step
    model = job.model
    base_lr = schedule.effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, rt.world_size)
    optimizer = torch.optim.AdamW(job.param_groups, lr=base_lr, betas=tuple(cfg.betas), fused=rt.device.type == "cuda")

    epoch, step_in_epoch, global_step = 0, 0, 0
    resume_path = None
    if resumed is not None:
        resume_path, state = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        rngs = state["rng"]
        runtime.set_rng_state(checkpoints.rng_from_saved(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0]))
        job.load_job_state(state.get("job", {}))
        del state, resumed
        logs.announce(f"resumed from {resume_path} at epoch {epoch}, step {global_step}", rt.main)

    net = DistributedDataParallel(model) if rt.distributed else model
    if cfg.compile:
        net = torch.compile(net)
    log = logs.MetricsLog(out, enabled=rt.main, resume_step=global_step if resume_path is not None else None)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    bar = logs.progress(total_steps, global_step, rt.main, job.kind)

    good = resume_path  # the newest checkpoint known to hold finite parameters, on every rank

    def ensure_finite() -> None:
        """Stops every rank before anything (validation, best.pth, a checkpoint) uses exploded parameters."""
        try:
            require_finite(model, rt, f"parameters are not finite after step {global_step} (epoch {epoch}): the "
                                      f"update exploded, so nothing was saved from it. {last_good_text(good)}; try "
                                      "a lower lr or --clip_grad.")
        except NonFiniteLoss:
            bar.close()  # the error then starts on its own line
            raise

    def checkpoint(checked: bool = False) -> Path:
        """Writes a checkpoint (rank 0) unless the parameters went non-finite; every rank calls it."""
        nonlocal good
        if not checked:
            ensure_finite()
        rngs = [runtime.rng_state()]
        if rt.distributed:  # every rank joins the gather; only rank 0 writes
            rngs = [None] * rt.world_size
            torch.distributed.all_gather_object(rngs, runtime.rng_state())
        good = checkpoints.path_for(out, global_step)
        if not rt.main:
            return good
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "step_in_epoch": step_in_epoch, "global_step": global_step,
                 "rng": [checkpoints.rng_to_saved(r) for r in rngs], "job": job.job_state(),
                 "config": config.to_dict(cfg), "kind": job.kind}
        path = checkpoints.save(out, global_step, state, cfg.keep_last)
        config.save(cfg, out / "config.json")
        return path

    fault_step = _injected_fault(rt.rank)
    last_path, loss_value, t_last, seen = None, float("nan"), time.perf_counter(), 0
    while epoch < cfg.epochs and global_step < total_steps:
        sampler.set_epoch(epoch, start=step_in_epoch * per_step)
        if step_in_epoch >= steps_per_epoch:
            loader = ()  # a checkpoint written before its epoch's end (older cxrfast): only the end is left
        elif job.batches is not None:
            loader = job.batches(sampler)
        else:
            # prepared shards are cropped by native threads in this process (workers would only
            # add shared-memory copies); image files are decoded in worker processes
            workers = 0 if getattr(job.dataset, "in_process", False) else cfg.num_workers
            loader = DataLoader(job.dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                                collate_fn=collate, drop_last=True, pin_memory=rt.device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG untouched
        net.train()
        micro = 0
        for batch in loader:
            batch = _to_device(batch, rt.device)
            final_micro = (micro + 1) % cfg.accum_iter == 0
            sync = contextlib.nullcontext() if final_micro or not rt.distributed else net.no_sync()
            with sync:
                with runtime.autocast(rt.device):
                    loss = job.loss(net, batch)
                if fault_step == global_step + 1:
                    loss = loss * float("nan")
                bad = (~torch.isfinite(loss.detach())).to(torch.int32)
                if _on_any_rank(bad, rt):  # every rank stops here together, none waits in a collective
                    bar.close()
                    where = (f"loss is {loss.item()}" if not rt.distributed
                             else f"loss is not finite on at least one of {rt.world_size} ranks")
                    raise NonFiniteLoss(f"{where} at step {global_step + 1} (epoch {epoch}); stopping. "
                                        f"{last_good_text(good)}; try a lower lr or --clip_grad.")
                loss_value = loss.item()  # for the log; cheap, the flag's sync above already waited for it
                (loss / cfg.accum_iter).backward()
            micro += 1
            seen += cfg.batch_size
            if not final_micro:
                continue
            lr = schedule.lr_at(epoch + step_in_epoch / steps_per_epoch, base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
            schedule.apply(optimizer, lr)
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            step_in_epoch += 1
            bar.update(1)
            if global_step % cfg.log_every == 0 or global_step == total_steps:
                mean_loss = runtime.mean_across_ranks(torch.tensor(loss_value)).item()
                now = time.perf_counter()
                ips = seen * rt.world_size / (now - t_last)
                t_last, seen = now, 0
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
                log.write(global_step, epoch=epoch, loss=mean_loss, lr=lr, images_per_s=round(ips, 1))
            if step_in_epoch >= steps_per_epoch:
                break  # the epoch end below validates and writes this step's checkpoint
            if global_step % cfg.save_every == 0 or global_step == total_steps:
                last_path = checkpoint()
            if global_step >= total_steps:
                break
        if step_in_epoch >= steps_per_epoch:
            ensure_finite()  # validation and best.pth never see exploded parameters
            epoch += 1
            step_in_epoch = 0
            metrics = job.on_epoch_end(epoch, global_step)
            if metrics:
                log.write(global_step, epoch=epoch, **metrics)
            # every epoch end is a resume point, written after its validation and best.pth with
            # the position of the next epoch, so a resume never repeats the epoch end
            last_path = checkpoint(checked=True)  # validation does not change the parameters
    bar.close()
    if last_path is None and rt.main:
        last_path = checkpoints.latest(out)
    agree, sums = runtime.checksums_agree(model)
    summary = {"steps": global_step, "epochs_done": epoch, "final_loss": loss_value,
               "checkpoint": str(last_path) if last_path else None, "world_size": rt.world_size,
               "ranks_agree": agree, "param_checksums": sums}
    if rt.main:
        atomic.write_text(out / "summary.json", json.dumps(summary, indent=2))
        log.close()
    if not agree:
        raise RuntimeError(f"ranks disagree after training: parameter checksums {sums}")
    return summary
