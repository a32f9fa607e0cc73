"""Fine-tune CXRBase on labelled chest X-rays (multi-label disease classification).

With no arguments this fine-tunes the demo pretraining checkpoint (run `python -m
train.pretrain` first) on the demo labels and reports validation AUROC.

Examples:
  python -m train.finetune
  python -m train.finetune --data /data/nih/images --labels Data_Entry_2017.csv \\
      --pretrained outputs/pretrain/checkpoint-00100000.pth --model vit_base --label_fraction 0.1
  python -m train.finetune --data /data/CheXpert-v1.0 --labels train.csv --uncertain ones
  python -m train.finetune --data /data --labels /data/CheXpert-v1.0-small/train.csv \\
      --test_labels /data/CheXpert-v1.0-small/valid.csv --label_set chexpert5 --view frontal \\
      --uncertain Atelectasis=ones,Edema=ones,*=zeros
  torchrun --nproc_per_node 8 -m train.finetune --config configs/finetune_vit_base.toml

Label CSVs: NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, RSNA Pneumonia, PadChest, VinDr-CXR or
generic (path,<label columns...>); see --label_format. Dataset protocols: --label_set chexpert5,
--uncertain Atelectasis=ones,Edema=ones,*=zeros, --view PA,AP, --split_files (NIH's official
lists), --test_labels valid.csv (CheXpert), --labels_map, --rad_vote (VinDr). Without an
official split or a split column, images are split by patient (--split_fractions train,val,test). Recipe defaults follow MAE fine-tuning: layer-wise lr
decay 0.75, drop path 0.1, AdamW weight decay 0.05, warmup then cosine.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from cxrfast import cli, errorfile
from cxrfast.data.direct import ImageDataset
from cxrfast.data.shards import PreparedDataset, is_prepared
from cxrfast.models import classifier
from cxrfast.models.checkpoints import CheckpointError, check_fits, load_file, load_pretrained, saved_config, slim
from cxrfast.models.vit import param_groups

from . import checkpoints, config, engine, inference, labelled, logs, metrics, runtime
from .config import opt
from .dataset_options import DatasetOptions

DEMO_DATA = Path("outputs") / "demo_dicom"
DEMO_PRETRAIN = Path("outputs") / "pretrain_demo"


@dataclass
class FinetuneConfig(DatasetOptions, engine.ImageConfig):
    data: Optional[str] = opt(None, "a prepared folder (labels and splits from its index), a folder of images, "
                                    "or a CSV with a 'path' column; none: the demo dataset")
    labels: Optional[str] = opt(None, "label CSV in one of the --label_format layouts; none: the demo labels")
    label_fraction: float = opt(1.0, "use this reproducible fraction of the training labels (e.g. 0.01, 0.1)",
                                maximum=1)
    split_fractions: tuple[float, ...] = opt((0.7, 0.1, 0.2), "patient-level train,val,test fractions",
                                             minimum=0, maximum=1)
    pretrained: Optional[str] = opt(None, "pretrained checkpoint (cxrfast, facebookresearch/mae, RETFound, timm); "
                                          "none: from scratch (the demo uses its pretraining checkpoint)")
    output_dir: str = opt("outputs/finetune", "where checkpoints, logs and metrics go")
    global_pool: bool = opt(True, "average the patch tokens (fc_norm) instead of using the CLS token")
    drop_path: float = opt(0.1, "stochastic depth rate", minimum=0, maximum=1)
    layer_decay: float = opt(0.75, "layer-wise lr decay", minimum=0)
    epochs: int = opt(50, "training epochs", minimum=1)
    blr: float = opt(5e-4, "base learning rate: lr = blr * effective batch / 256", minimum=0)
    min_lr: float = opt(1e-6, "learning rate at the end of the cosine decay", minimum=0)
    crop_scale: tuple[float, ...] = opt((0.5, 1.0), "random resized crop area range", minimum=0, maximum=1)
    label_smoothing: float = opt(0.0, "smooth binary targets towards 0.5 by this amount", minimum=0, maximum=1)
    mixup: float = opt(0.0, "mixup alpha (0: off)", minimum=0)
    cutmix: float = opt(0.0, "cutmix alpha (0: off); with mixup, each batch picks one at random", minimum=0)

    def validate(self) -> None:
        super().validate()
        if not self.label_fraction > 0:
            raise config.UsageError(f"--label_fraction {self.label_fraction}: must be in (0, 1]")
        cli.check_fractions(self.split_fractions, "--split_fractions")


DEMO = dict(output_dir="outputs/finetune_demo", model="vit_tiny", img_size=128, epochs=12, warmup_epochs=2,
            batch_size=8, lr=5e-4, num_workers=0, save_every=1000, log_every=5, split_fractions=(0.6, 0.2, 0.2))


def main(argv: list[str] | None = None) -> dict:
    with config.user_errors():
        return _main(argv)


def _main(argv: list[str] | None) -> dict:
    cfg, explicit = config.parse(FinetuneConfig, argv, "python -m train.finetune", __doc__)
    if cfg.data is None:
        updates = {k: v for k, v in DEMO.items() if k not in explicit}
        updates["data"] = str(DEMO_DATA)
        if cfg.labels is None:
            updates["labels"] = str(DEMO_DATA / "labels.csv")
        if cfg.pretrained is None:
            latest = checkpoints.latest(DEMO_PRETRAIN)
            if latest is None:
                raise config.UsageError(f"no demo pretraining checkpoint in {DEMO_PRETRAIN}; run `python -m "
                                        "train.pretrain` first (or pass --pretrained)")
            updates["pretrained"] = str(latest)
        cfg = dataclasses.replace(cfg, **updates)
    cfg, pretrained = resolve_pretrained(cfg, explicit)
    held = {"weights": pretrained}  # handed over once, so the run does not keep a second copy alive
    del pretrained
    return engine.launch(cfg, lambda rt: finetune(cfg, rt, held.pop("weights", None)))


def resolve_pretrained(cfg: FinetuneConfig, explicit: set[str]) -> tuple[FinetuneConfig, dict | None]:
    """Reads ``--pretrained`` before anything is written and makes the model fit it.

    The preset, image size and channels come from the checkpoint's saved config unless set
    explicitly; an explicit other preset is an error (its tensors cannot fit), an explicit
    other size or channel count is converted (position-embedding resampling, channel
    sum/repeat). Every problem ends in one ``error:`` line and exit code 2. Returns the
    config and the checkpoint's weights alone (``{'model': state dict}``, no optimizer state).
    """
    if not cfg.pretrained:
        return cfg, None
    try:
        ckpt = load_file(cfg.pretrained)
    except CheckpointError as exc:
        config.fail(f"--pretrained {exc}" if not Path(cfg.pretrained).is_file() else str(exc))
    saved = saved_config(ckpt)
    if isinstance(ckpt, dict):
        ckpt = slim(ckpt, cfg.pretrained)  # the weights and their input normalisation, not the optimizer
    if "model" in saved and "model" in explicit and saved["model"] != cfg.model:
        config.fail(f"--model {cfg.model} does not fit --pretrained {cfg.pretrained}, a {saved['model']} checkpoint; "
                 f"leave --model out (or pass --model {saved['model']}) to fine-tune it")
    taken = {k: v for k, v in saved.items() if k not in explicit and v != getattr(cfg, k)}
    if taken:
        cfg = dataclasses.replace(cfg, **taken)
        logs.announce(f"from {cfg.pretrained}'s config: " + ", ".join(f"--{k} {v}" for k, v in taken.items()),
                      os.environ.get("RANK", "0") == "0")
    try:
        with torch.device("meta"):  # shapes only: checks the fit before the output folder exists
            probe = build_model(cfg, 1)
        check_fits(probe, ckpt, cfg.allow_mismatch, cfg.pretrained)
    except (CheckpointError, ValueError) as exc:
        config.fail(str(exc))
    return cfg, ckpt


def mix(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, cfg: FinetuneConfig):
    """Mixup or CutMix of a batch (global RNG, so exact resume still holds).

    Its bool/float/int reads are of CPU tensors from the global CPU generator: host values,
    not device syncs (the batch itself is only indexed and blended on the device)."""
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cfg.cutmix if use_cutmix else cfg.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * y + (1 - lam) * y[perm], valid & valid[perm]


def make_loss(cfg: FinetuneConfig):
    def loss(net, batch):
        x, y = batch
        valid = ~torch.isnan(y)
        y = torch.nan_to_num(y, nan=0.0)
        if net.training and (cfg.mixup > 0 or cfg.cutmix > 0):
            x, y, valid = mix(x, y, valid, cfg)
        y = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        logits = net(x).float()
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (bce * valid).sum() / valid.sum().clamp(min=1)
    return loss


def build_model(cfg: FinetuneConfig, num_classes: int) -> torch.nn.Module:
    return classifier(cfg.model, img_size=cfg.img_size, in_chans=cfg.in_chans, num_classes=num_classes,
                      global_pool=cfg.global_pool, drop_path_rate=cfg.drop_path)


def finetune(cfg: FinetuneConfig, rt: runtime.Runtime, pretrained: Any = None) -> dict:
    out = Path(cfg.output_dir)  # made (with config.json) only once the inputs are known to be good
    batches, backend, notes = None, "", []
    if is_prepared(cfg.data):
        names, parts = labelled.load_prepared(cfg.data, cfg.label_fraction, cfg.seed)
        if not len(parts["train"]):
            raise config.UsageError(f"--data {cfg.data}: the training split is empty")
        dataset, backend, batches = engine.prepared_input(cfg, parts["train"], rt, with_labels=True)
        val = PreparedDataset(parts["val"], img_size=cfg.img_size, in_chans=cfg.in_chans, train=False,
                              with_labels=True) if len(parts["val"]) else None
        val_labels = parts["val"].labels
        counts = {k: len(v) for k, v in parts.items()}
    else:
        if cfg.labels is None:
            raise config.UsageError(f"--data {cfg.data}: --labels is required (unless --data is a prepared folder)")
        data = labelled.load(cfg.data, cfg.labels, cfg.label_format, cfg.uncertain, cfg.label_fraction,
                             tuple(cfg.split_fractions), cfg.seed, labelled.protocol_of(cfg))
        notes = data.notes
        names = data.names
        train_split, val_split = data.splits["train"], data.splits["val"]
        if not train_split.files:
            raise config.UsageError(f"--data {cfg.data}: no image is in the training split")
        dataset = ImageDataset(train_split.files, img_size=cfg.img_size, in_chans=cfg.in_chans, train=True,
                               crop_scale=tuple(cfg.crop_scale), labels=train_split.labels, seed=cfg.seed,
                               decode_size=cfg.decode_size, errors_path=out / errorfile.NAME)
        val = ImageDataset(val_split.files, img_size=cfg.img_size, in_chans=cfg.in_chans, train=False,
                           labels=val_split.labels, substitute=False) if val_split.files else None
        val_labels = val_split.labels
        counts = {k: len(v.files) for k, v in data.splits.items()}
    engine.check_batch(len(dataset), cfg, rt.world_size)
    resumed = engine.read_resume(cfg, rt)
    engine.start(cfg, rt)
    logs.announce(f"{len(names)} labels {names}; images: " + ", ".join(f"{k} {v}" for k, v in counts.items()), rt.main)
    for note in notes:
        logs.announce(note, rt.main)
    model = build_model(cfg, len(names)).to(rt.device)
    if cfg.pretrained:
        report = load_pretrained(model, pretrained if pretrained is not None else cfg.pretrained,
                                 allow_mismatch=cfg.allow_mismatch, name=cfg.pretrained)
        pretrained = None  # the weights now live in the model
        logs.announce(f"loaded {cfg.pretrained}: {report.describe()}", rt.main)
    best = {"mean_auroc": -1.0, "epoch": 0}

    def on_epoch_end(epoch: int, step: int) -> dict:
        """Validation on every rank (each scores its share; all get the gathered scores, so
        every rank keeps the same best); unreadable images are dropped with their labels."""
        if val is None:
            return {}
        pred = inference.predict(model, val, rt.device, cfg.batch_size)
        if rt.main:  # rewritten every time, so a clean run leaves no stale rows of an earlier one
            inference.write_errors(out / "val_errors.csv", pred.failed)
        if not len(pred.indices):
            return {"val_images": 0, "val_unreadable": pred.unreadable}
        result = metrics.per_class(val_labels[pred.indices], pred.values, names)
        result.update(images=len(pred.indices), unreadable=pred.unreadable)
        if not math.isnan(result["mean_auroc"]) and result["mean_auroc"] > best["mean_auroc"]:
            best.update(mean_auroc=result["mean_auroc"], epoch=epoch)
            if rt.main:
                save_model(out / "best.pth", model, cfg, names, result)
        return {"val_mean_auroc": result["mean_auroc"], "val_mean_auprc": result["mean_auprc"],
                "val_images": len(pred.indices), "val_unreadable": pred.unreadable}

    job = engine.Job("finetune", model, dataset, param_groups(model, cfg.weight_decay, cfg.layer_decay),
                     loss=make_loss(cfg), on_epoch_end=on_epoch_end, job_state=lambda: dict(best),
                     load_job_state=lambda s: best.update(s), batches=batches,
                     loader=f"{backend} loader over prepared shards" if backend else "")
    summary = engine.run(cfg, rt, job, resumed)
    if val is not None and best["epoch"] == 0:  # stopped (max_steps) before any epoch ended: judge the
        on_epoch_end(summary["epochs_done"], summary["steps"])  # final model (every rank takes part)
    if rt.main:
        final = save_model(out / "final.pth", model, cfg, names, None)
        if val is None:  # no validation split to choose by: the final model is the one to use
            save_model(out / "best.pth", model, cfg, names, None)
        summary.update(best_val_mean_auroc=best["mean_auroc"], best_epoch=best["epoch"])
        judged = f"{best['mean_auroc']:.4f} (epoch {best['epoch']})" if best["mean_auroc"] >= 0 else "n/a (no validation split)"
        print(f"\nfine-tuning done: {summary['steps']} steps; best validation mean AUROC {judged}\n"
              f"  best model:  {out / 'best.pth'}\n  final model: {final}\n"
              f"  metrics:     {out / 'metrics.jsonl'}\n"
              f"  evaluate:    python -m train.evaluate --checkpoint {out / 'best.pth'}")
    return summary


def save_model(path: Path, model: torch.nn.Module, cfg: FinetuneConfig, names: list[str], result) -> Path:
    """A self-describing model file: weights, label names, the config that built it.

    Never written from non-finite parameters: train.evaluate reads best.pth by default."""
    if engine.params_not_finite(model).item():  # host sync, once per model file
        raise engine.NonFiniteLoss(f"parameters are not finite, so {path} was not written; try a lower lr or "
                                   "--clip_grad.")
    checkpoints.save_atomic({"model": model.state_dict(), "label_names": names, "config": config.to_dict(cfg),
                             "val_metrics": result, "kind": "cxrfast-classifier"}, path)
    return path


if __name__ == "__main__":
    main()
