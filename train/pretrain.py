"""Pretrain CXRBase: an MAE Vision Transformer on unlabelled chest X-rays.

With no arguments this runs a short demonstration (about a minute on 2 CPU cores): it
generates 48 synthetic chest radiographs as DICOM files, pretrains a small MAE on them and
prints where the checkpoints, logs and reconstruction pictures went.

Examples:
  python -m train.pretrain                                     # the demo
  python -m train.pretrain --data /archive/cxr --model vit_base --epochs 800 --batch_size 256
  torchrun --nproc_per_node 8 -m train.pretrain --data /archive/cxr --config mae_base.toml
  python -m train.pretrain --data /archive/cxr --resume auto   # continue a killed run exactly

The recipe follows facebookresearch/mae: AdamW (0.9, 0.95), weight decay 0.05,
lr = blr x effective batch / 256, per-iteration warmup then cosine decay.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cxrfast.data import ResumableSampler, find_images
from cxrfast.data.direct import MEAN, STD, ImageDataset
from cxrfast.models import mae
from cxrfast.models.checkpoints import load_pretrained
from cxrfast.models.vit import param_groups
from cxrfast.synthetic import ensure_demo_dataset

from . import checkpoints, config, logs, pictures, runtime, schedule
from .config import opt

DEMO_DATA = Path("outputs") / "demo_dicom"


@dataclass
class PretrainConfig:
    data: Optional[str] = opt(None, "folder of DICOM/PNG/JPEG files, or a CSV with a 'path' column; "
                                    "none: the embedded demo dataset")
    output_dir: str = opt("outputs/pretrain", "where checkpoints, logs and pictures go")
    model: str = opt("vit_base", "encoder preset: vit_tiny, vit_small, vit_base, vit_large, vit_huge")
    img_size: int = opt(224, "input size (a multiple of the patch size; 448 and 512 suit CXR)")
    in_chans: int = opt(1, "input channels (1 for grey CXR, 3 to match RGB checkpoints)")
    mask_ratio: float = opt(0.75, "fraction of patches hidden from the encoder (0.9 is common for CXR)")
    norm_pix_loss: bool = opt(True, "normalise each target patch by its mean and variance")
    decoder_dim: int = opt(512, "decoder width")
    decoder_depth: int = opt(8, "decoder blocks")
    decoder_heads: int = opt(16, "decoder attention heads")
    init: Optional[str] = opt(None, "initialise from a checkpoint (facebookresearch/mae, RETFound, cxrfast)")
    epochs: int = opt(800, "training epochs")
    warmup_epochs: float = opt(40, "linear warmup epochs")
    batch_size: int = opt(64, "images per GPU (or process) per micro-batch")
    accum_iter: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    blr: float = opt(1.5e-4, "base learning rate: lr = blr * effective batch / 256")
    lr: Optional[float] = opt(None, "absolute learning rate (overrides blr)")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine decay")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms, tokens)")
    betas: tuple[float, ...] = opt((0.9, 0.95), "AdamW betas")
    clip_grad: Optional[float] = opt(None, "clip the gradient norm to this value")
    crop_scale: tuple[float, ...] = opt((0.2, 1.0), "random resized crop area range")
    decode_size: Optional[int] = opt(None, "decode files with this longer side before cropping (default 2 x img_size)")
    num_workers: int = opt(4, "data loader worker processes per rank")
    seed: int = opt(0, "random seed")
    save_every: int = opt(1000, "write a checkpoint every N optimizer steps (and at the end)")
    keep_last: int = opt(3, "checkpoints to keep")
    eval_every: int = opt(10, "write a reconstruction picture every N epochs")
    log_every: int = opt(10, "log metrics every N optimizer steps")
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps in total")
    resume: Optional[str] = opt(None, "checkpoint to resume from, or 'auto' for the newest in output_dir")
    compile: bool = opt(False, "torch.compile the model")
    device: str = opt("auto", "cuda, cpu or auto")


DEMO = dict(output_dir="outputs/pretrain_demo", model="vit_tiny", img_size=128, decoder_dim=128, decoder_depth=2,
            decoder_heads=4, epochs=40, warmup_epochs=4, batch_size=16, lr=1e-3, num_workers=0, save_every=40,
            eval_every=10, log_every=5)


class NonFiniteLoss(RuntimeError):
    pass


def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    return mae(cfg.model, img_size=cfg.img_size, in_chans=cfg.in_chans, decoder_embed_dim=cfg.decoder_dim,
               decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_heads,
               norm_pix_loss=cfg.norm_pix_loss, mask_ratio=cfg.mask_ratio)


def main(argv: list[str] | None = None) -> dict:
    cfg, explicit = config.parse(PretrainConfig, argv, "python -m train.pretrain", __doc__)
    if cfg.data is None:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in DEMO.items() if k not in explicit})
    rt = runtime.setup(cfg.device)
    try:
        if cfg.data is None:
            if rt.main:
                ensure_demo_dataset(DEMO_DATA)
            if rt.distributed:
                torch.distributed.barrier()
            cfg = dataclasses.replace(cfg, data=str(DEMO_DATA))
        return train(cfg, rt)
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        runtime.teardown()


def train(cfg: PretrainConfig, rt: runtime.Runtime) -> dict:
    out = Path(cfg.output_dir)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / "config.json")
    runtime.seed_everything(cfg.seed + rt.rank)

    files = find_images(cfg.data)
    dataset = ImageDataset(files, img_size=cfg.img_size, in_chans=cfg.in_chans, train=True,
                           crop_scale=tuple(cfg.crop_scale), seed=cfg.seed, decode_size=cfg.decode_size,
                           errors_path=out / "errors.tsv")
    sampler = ResumableSampler(len(dataset), rank=rt.rank, world_size=rt.world_size, seed=cfg.seed)
    per_step = cfg.batch_size * cfg.accum_iter
    steps_per_epoch = len(sampler.indices()) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(files)} images are too few for batch {cfg.batch_size} x accum "
                         f"{cfg.accum_iter} x {rt.world_size} processes")

    model = build_model(cfg).to(rt.device)
    if cfg.init:
        result = load_pretrained(model, cfg.init)
        logs.announce(f"initialised from {cfg.init} (missing {len(result.missing_keys)} keys)", rt.main)
    base_lr = schedule.effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, rt.world_size)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr, betas=tuple(cfg.betas),
                                  fused=rt.device.type == "cuda")

    epoch, step_in_epoch, global_step = 0, 0, 0
    resume_path = checkpoints.resolve(cfg.resume, out)
    if resume_path is not None:
        state = checkpoints.load(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        runtime.set_rng_state(state["rng"][rt.rank] if isinstance(state["rng"], list) else state["rng"])
        logs.announce(f"resumed from {resume_path} at epoch {epoch}, step {global_step}", rt.main)

    net = DistributedDataParallel(model) if rt.distributed else model
    if cfg.compile:
        net = torch.compile(net)
    log = logs.MetricsLog(out, enabled=rt.main)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    bar = logs.progress(total_steps, global_step, rt.main, "pretrain")
    preview = ImageDataset(files[:8], img_size=cfg.img_size, in_chans=cfg.in_chans, train=False)

    def state_dict() -> dict:
        rngs = [runtime.rng_state()]
        if rt.distributed:
            rngs = [None] * rt.world_size
            torch.distributed.all_gather_object(rngs, runtime.rng_state())
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": global_step, "rng": rngs,
                "config": config.to_dict(cfg), "kind": "cxrfast-mae"}

    def checkpoint() -> Path | None:
        state = state_dict()  # every rank joins the RNG gather; only rank 0 writes
        return checkpoints.save(out, global_step, state, cfg.keep_last) if rt.main else None

    last_path, loss_value, t_last, seen = None, float("nan"), time.perf_counter(), 0
    while epoch < cfg.epochs and global_step < total_steps:
        sampler.set_epoch(epoch, start=step_in_epoch * per_step)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            drop_last=True, pin_memory=rt.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
        net.train()
        micro = 0
        for imgs in loader:
            imgs = imgs.to(rt.device, non_blocking=True)
            final_micro = (micro + 1) % cfg.accum_iter == 0
            sync = contextlib_nullcontext() if final_micro or not rt.distributed else net.no_sync()
            with sync:
                with runtime.autocast(rt.device):
                    loss, _, _ = net(imgs)
                loss_value = loss.item()  # host-device sync: the non-finite guard needs the value
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(f"loss is {loss_value} at step {global_step + 1} (epoch {epoch}); stopping. "
                                        f"The last good checkpoint is {checkpoints.latest(out)}; try a lower lr "
                                        "or --clip_grad.")
                (loss / cfg.accum_iter).backward()
            micro += 1
            seen += imgs.shape[0]
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
            if global_step % cfg.save_every == 0 or global_step == total_steps:
                last_path = checkpoint()
            if global_step >= total_steps:
                break
        if step_in_epoch >= steps_per_epoch:
            epoch += 1
            step_in_epoch = 0
            if rt.main and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                picture = save_reconstructions(model, preview, cfg, rt.device, out / "reconstructions" / f"epoch_{epoch:04d}.png")
                log.write(global_step, epoch=epoch, reconstruction=str(picture))
    bar.close()
    if global_step % cfg.save_every != 0 and global_step != total_steps:
        last_path = checkpoint()
    agree, sums = runtime.checksums_agree(model)
    summary = {"steps": global_step, "epochs_done": epoch, "final_loss": loss_value,
               "checkpoint": str(last_path or checkpoints.latest(out)), "world_size": rt.world_size,
               "ranks_agree": agree, "param_checksums": sums}
    if rt.main:
        picture = save_reconstructions(model, preview, cfg, rt.device, out / "reconstructions" / "final.png")
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        log.close()
        print(f"\npretraining done: {global_step} steps, last loss {loss_value:.4f}\n"
              f"  checkpoint:      {summary['checkpoint']}\n"
              f"  config:          {out / 'config.json'}\n"
              f"  metrics:         {out / 'metrics.jsonl'} (TensorBoard: {out / 'tensorboard'})\n"
              f"  reconstructions: {picture}\n"
              f"  unreadable files (if any): {out / 'errors.tsv'}")
    if not agree:
        raise RuntimeError(f"ranks disagree after training: parameter checksums {sums}")
    return summary


def contextlib_nullcontext():
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def save_reconstructions(model, preview: ImageDataset, cfg: PretrainConfig, device: torch.device, path: Path) -> Path:
    was_training = model.training
    model.eval()
    imgs = torch.stack([preview[i] for i in range(len(preview))]).to(device)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
    _, pred, mask = model(imgs, noise=noise)
    recon = model.reconstruct(pred.float(), imgs.float())
    model.train(was_training)
    return pictures.reconstruction_grid(imgs.float().cpu(), recon.cpu(), mask.cpu(), cfg_patch(model), path, MEAN, STD)


def cfg_patch(model) -> int:
    return model.patch_embed.patch_size


if __name__ == "__main__":
    main()
