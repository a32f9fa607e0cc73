"""Pretrain CXRBase: an MAE Vision Transformer on unlabelled chest X-rays.

With no arguments this runs a short demonstration (about a minute on 2 CPU cores): it
generates 96 synthetic chest radiographs as DICOM files, pretrains a small MAE on them and
prints where the checkpoints, logs and reconstruction pictures went.

Examples:
  python -m train.pretrain                                     # the demo
  python -m train.pretrain --data /archive/cxr --model vit_base --epochs 800 --batch_size 256
  torchrun --nproc_per_node 8 -m train.pretrain --data /archive/cxr --config configs/pretrain_vit_base.toml
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m train.pretrain --data /archive/cxr
  python -m train.pretrain --data /archive/cxr --resume auto   # continue a killed run exactly

The recipe follows facebookresearch/mae: AdamW (0.9, 0.95), weight decay 0.05,
lr = blr x effective batch / 256, per-iteration warmup then cosine decay.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cxrfast import cli, errorfile
from cxrfast.data.direct import MEAN, STD, ImageDataset
from cxrfast.data.shards import PreparedData, PreparedDataset, is_prepared
from cxrfast.models import mae
from cxrfast.models.checkpoints import CheckpointError, check_fits, load_file, load_pretrained
from cxrfast.models.vit import PRETRAIN_NO_DECAY, param_groups
from cxrfast.synthetic import ensure_demo_dataset

from . import config, engine, logs, pictures, runtime
from .config import opt

DEMO_DATA = Path("outputs") / "demo_dicom"


@dataclass
class PretrainConfig(engine.ImageConfig):
    data: Optional[str] = opt(None, "a folder prepared by `python -m cxrfast.prepare`, a folder of "
                                    "DICOM/PNG/JPEG files, or a CSV with a 'path' column; none: the demo dataset")
    output_dir: str = opt("outputs/pretrain", "where checkpoints, logs and pictures go")
    mask_ratio: float = opt(0.75, "fraction of patches hidden from the encoder (0.9 is common for CXR)",
                            minimum=0, maximum=0.99)
    norm_pix_loss: bool = opt(True, "normalise each target patch by its mean and variance")
    decoder_dim: int = opt(512, "decoder width", minimum=1)
    decoder_depth: int = opt(8, "decoder blocks", minimum=1)
    decoder_heads: int = opt(16, "decoder attention heads", minimum=1)
    init: Optional[str] = opt(None, "initialise from a checkpoint (facebookresearch/mae, RETFound, cxrfast)")
    epochs: int = opt(800, "training epochs", minimum=1)
    warmup_epochs: float = opt(40, "linear warmup epochs", minimum=0)
    blr: float = opt(1.5e-4, "base learning rate: lr = blr * effective batch / 256", minimum=0)
    betas: tuple[float, ...] = opt((0.9, 0.95), "AdamW betas", minimum=0, maximum=1)
    eval_every: int = opt(10, "write a reconstruction picture every N epochs", minimum=1)


DEMO = dict(output_dir="outputs/pretrain_demo", model="vit_tiny", img_size=128, decoder_dim=128, decoder_depth=2,
            decoder_heads=4, epochs=20, warmup_epochs=2, batch_size=16, lr=1e-3, num_workers=0, save_every=60,
            eval_every=5, log_every=5)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """facebookresearch/mae's pretraining groups: cls_token and mask_token decay, only 1-D
    parameters and biases do not (the benchmarks build the same groups through this)."""
    return param_groups(model, weight_decay, no_decay=PRETRAIN_NO_DECAY)


def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    return mae(cfg.model, img_size=cfg.img_size, in_chans=cfg.in_chans, decoder_embed_dim=cfg.decoder_dim,
               decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_heads,
               norm_pix_loss=cfg.norm_pix_loss, mask_ratio=cfg.mask_ratio)


def mae_loss(net: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """The pretraining loss: the MAE's masked-patch reconstruction error (its first output)."""
    return net(imgs)[0]


def main(argv: list[str] | None = None) -> dict:
    with config.user_errors():
        return _main(argv)


def _main(argv: list[str] | None) -> dict:
    cfg, explicit = config.parse(PretrainConfig, argv, "python -m train.pretrain", __doc__)
    if cfg.data is None:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in DEMO.items() if k not in explicit})

    def body(rt: runtime.Runtime) -> dict:
        nonlocal cfg
        if cfg.data is None:
            if rt.main:
                ensure_demo_dataset(DEMO_DATA)
            if rt.distributed:
                torch.distributed.barrier()
            cfg = dataclasses.replace(cfg, data=str(DEMO_DATA))
        return pretrain(cfg, rt)

    return engine.launch(cfg, body)


def pretrain(cfg: PretrainConfig, rt: runtime.Runtime) -> dict:
    out = Path(cfg.output_dir)  # made (with config.json) only once the inputs are known to be good
    batches, backend = None, ""
    if is_prepared(cfg.data):  # prepared shards: memmap, augmentation by the chosen backend
        prepared = PreparedData(cfg.data)
        dataset, backend, batches = engine.prepared_input(cfg, prepared, rt, with_labels=False)
        preview = PreparedDataset(prepared.subset(range(min(8, len(prepared)))), img_size=cfg.img_size,
                                  in_chans=cfg.in_chans, train=False)
        logs.announce(f"prepared data: {len(prepared)} images, loader {backend}", rt.main)
    else:  # files decoded on the fly
        files = cli.image_files(cfg.data)
        dataset = ImageDataset(files, img_size=cfg.img_size, in_chans=cfg.in_chans, train=True,
                               crop_scale=tuple(cfg.crop_scale), seed=cfg.seed, decode_size=cfg.decode_size,
                               errors_path=out / errorfile.NAME)
        preview = ImageDataset(files[:8], img_size=cfg.img_size, in_chans=cfg.in_chans, train=False)
    engine.check_batch(len(dataset), cfg, rt.world_size)
    init = read_init(cfg)
    resumed = engine.read_resume(cfg, rt)
    engine.start(cfg, rt)
    model = build_model(cfg).to(rt.device)
    if init is not None:
        report = load_pretrained(model, init, allow_mismatch=cfg.allow_mismatch, name=cfg.init)
        del init  # the weights now live in the model
        logs.announce(f"initialised from {cfg.init}: {report.describe()}", rt.main)

    def on_epoch_end(epoch: int, step: int) -> dict:
        if rt.main and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            # a Path to a PNG: metrics.jsonl records it, TensorBoard shows the picture (logs.MetricsLog)
            return {"reconstruction": save_reconstructions(model, preview, rt.device,
                                                           out / "reconstructions" / f"epoch_{epoch:04d}.png")}
        return {}

    job = engine.Job("pretrain", model, dataset, optimizer_groups(model, cfg.weight_decay),
                     loss=mae_loss, on_epoch_end=on_epoch_end, batches=batches,
                     loader=f"{backend} loader over prepared shards" if backend else "")
    summary = engine.run(cfg, rt, job, resumed)
    if rt.main:
        picture = save_reconstructions(model, preview, rt.device, out / "reconstructions" / "final.png")
        print(f"\npretraining done: {summary['steps']} steps, last loss {summary['final_loss']:.4f}\n"
              f"  checkpoint:      {summary['checkpoint']}\n"
              f"  config:          {out / 'config.json'}\n"
              f"  metrics:         {out / 'metrics.jsonl'} (TensorBoard: {out / 'tensorboard'})\n"
              f"  reconstructions: {picture}\n"
              f"  unreadable files (if any): {out / errorfile.NAME}")
    return summary


def read_init(cfg: PretrainConfig):
    """The ``--init`` checkpoint, read and checked against the model's shapes before anything
    is written (a missing, unreadable, unsafe or ill-fitting file is one error line, exit 2)."""
    if not cfg.init:
        return None
    try:
        ckpt = load_file(cfg.init)
        with torch.device("meta"):  # shapes only, nothing allocated
            probe = build_model(cfg)
        check_fits(probe, ckpt, cfg.allow_mismatch, cfg.init)
    except CheckpointError as exc:
        raise config.UsageError(f"--init {exc}" if not Path(cfg.init).is_file() else str(exc)) from None
    return ckpt


@torch.no_grad()
def save_reconstructions(model, preview, device: torch.device, path: Path) -> Path:
    """original | masked | reconstruction | pasted, for fixed images and a fixed mask, captioned
    with the mask ratio and (norm_pix_loss) how the reconstruction was de-normalised."""
    was_training = model.training
    model.eval()
    imgs = torch.stack([preview[i] for i in range(len(preview))]).to(device)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
    with runtime.autocast(device):
        _, pred, mask = model(imgs, noise=noise.to(device))
    recon = model.reconstruct(pred.float(), imgs.float())
    model.train(was_training)
    caption = pictures.reconstruction_caption(model.norm_pix_loss, float(mask.float().mean()))
    return pictures.reconstruction_grid(imgs.float().cpu(), recon.cpu(), mask.float().cpu(),
                                        model.patch_embed.patch_size, path, MEAN, STD, caption)


if __name__ == "__main__":
    main()
