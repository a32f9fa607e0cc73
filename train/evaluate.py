"""Evaluate a fine-tuned CXRBase classifier, or linear-probe a pretrained encoder.

Writes per-class AUROC and AUPRC (a table on screen, metrics.json, metrics.md) and a
ROC-curve PNG. With no arguments it evaluates the demo fine-tuning result
(`outputs/finetune_demo/best.pth`) on the demo test split.

Examples:
  python -m train.evaluate
  python -m train.evaluate --checkpoint outputs/finetune/best.pth --split test
  python -m train.evaluate --linear_probe true --checkpoint outputs/pretrain/checkpoint-00100000.pth \\
      --data /data/nih/images --labels Data_Entry_2017.csv

The data, labels and split default to those the checkpoint was fine-tuned with, so the test
split is the same patient-level split the fine-tuning run held out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cxrfast import atomic
from cxrfast.data.direct import ImageDataset
from cxrfast.data.shards import PreparedDataset, is_prepared
from cxrfast.models import classifier
from cxrfast.models.checkpoints import load_file, load_pretrained

from . import config, inference, labelled, logs, metrics, pictures, runtime
from .config import opt

DEMO_CHECKPOINT = Path("outputs") / "finetune_demo" / "best.pth"


@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = opt(None, "fine-tuned model (best.pth / final.pth), or a pretrained checkpoint "
                                          "with --linear_probe; none: the demo fine-tuning result")
    data: Optional[str] = opt(None, "images (default: those the checkpoint was fine-tuned on)")
    labels: Optional[str] = opt(None, "label CSV (default: the checkpoint's)")
    label_format: Optional[str] = opt(None, "auto, nih14, chexpert or generic (default: the checkpoint's)")
    uncertain: Optional[str] = opt(None, "ones, zeros or ignore (default: the checkpoint's)")
    split: str = opt("test", "which split to evaluate: train, val or test")
    split_fractions: Optional[tuple[float, ...]] = opt(None, "patient split fractions (default: the checkpoint's)")
    output_dir: str = opt("outputs/evaluate", "where metrics.json, metrics.md and roc.png go")
    linear_probe: bool = opt(False, "fit a logistic-regression probe on frozen encoder features of the train split")
    probe_l2: float = opt(1e-3, "L2 penalty of the linear probe")
    model: Optional[str] = opt(None, "encoder preset when the checkpoint does not say")
    img_size: Optional[int] = opt(None, "input size when the checkpoint does not say")
    batch_size: int = opt(64, "inference batch size")
    num_workers: int = opt(0, "data loader workers")
    seed: int = opt(0, "seed of the label-fraction subset")
    device: str = opt("auto", "cuda, cpu or auto")


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = config.parse(EvaluateConfig, argv, "python -m train.evaluate", __doc__)
    path = Path(cfg.checkpoint) if cfg.checkpoint else DEMO_CHECKPOINT
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}" + ("; run `python -m train.pretrain` and "
                         "`python -m train.finetune` first" if cfg.checkpoint is None else ""))
    rt = runtime.setup(cfg.device)
    try:
        return evaluate(cfg, path, rt)
    finally:
        runtime.teardown()


def _pick(value, saved: dict, key: str, default=None):
    return value if value is not None else saved.get(key, default)


def evaluate(cfg: EvaluateConfig, path: Path, rt: runtime.Runtime) -> dict:
    ckpt = load_file(path)  # data only: a checkpoint cannot run code
    saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    data_src, labels_src = _pick(cfg.data, saved, "data"), _pick(cfg.labels, saved, "labels")
    prepared = is_prepared(data_src)
    if not data_src or not (labels_src or prepared):
        raise SystemExit("error: --data and --labels are needed (the checkpoint does not name them)")
    if prepared:
        label_names, parts = labelled.load_prepared(data_src)
        data = labelled.LabelledData(label_names, {})
        split, train_part = parts[cfg.split], parts["train"]
        size = len(split)
    else:
        fractions = tuple(_pick(cfg.split_fractions, saved, "split_fractions", (0.7, 0.1, 0.2)))
        data = labelled.load(data_src, labels_src, _pick(cfg.label_format, saved, "label_format", "auto"),
                             _pick(cfg.uncertain, saved, "uncertain", "ones"), 1.0, fractions, cfg.seed)
        split, train_part = data.splits[cfg.split], data.splits["train"]
        size = len(split.files)
    if not size:
        raise SystemExit(f"error: the {cfg.split} split is empty")
    model_name = _pick(cfg.model, saved, "model", "vit_base")
    img_size = _pick(cfg.img_size, saved, "img_size", 224)
    in_chans = saved.get("in_chans", 1)
    names = ckpt.get("label_names", data.names) if not cfg.linear_probe else data.names
    model = classifier(model_name, img_size=img_size, in_chans=in_chans, num_classes=len(names),
                       global_pool=saved.get("global_pool", True), drop_path_rate=0.0)
    if cfg.linear_probe:
        load_pretrained(model, ckpt, name=str(path))
    else:
        model.load_state_dict(ckpt["model"])
    model.to(rt.device)

    def ds(part):
        if prepared:
            return PreparedDataset(part, img_size=img_size, in_chans=in_chans, train=False, with_labels=True)
        return ImageDataset(part.files, img_size=img_size, in_chans=in_chans, train=False, labels=part.labels)

    if cfg.linear_probe:
        train_split = train_part
        feats_train = inference.predict(model, ds(train_split), rt.device, cfg.batch_size, features=True)
        feats_eval = inference.predict(model, ds(split), rt.device, cfg.batch_size, features=True)
        scores = linear_probe(feats_train, train_split.labels, feats_eval, cfg.probe_l2)
    else:
        scores = inference.predict(model, ds(split), rt.device, cfg.batch_size, num_workers=cfg.num_workers)
    result = metrics.per_class(split.labels, scores, names)
    result.update(checkpoint=str(path), split=cfg.split, images=size,
                  mode="linear_probe" if cfg.linear_probe else "classifier")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = metrics.table(result)
    atomic.write_text(out / "metrics.json", json.dumps(result, indent=2, default=float))
    atomic.write_text(out / "metrics.md", f"# {result['mode']} on the {cfg.split} split ({size} images)\n\n"
           f"checkpoint: `{path}`\n\n```\n{text}\n```\n")
    curves = {}
    for j, name in enumerate(names):
        auc = result["classes"][name]["auroc"]
        if not np.isnan(auc):
            fpr, tpr = metrics.roc_curve(split.labels[:, j], scores[:, j])
            curves[name] = (fpr, tpr, auc)
    if curves:
        pictures.roc_figure(curves, out / "roc.png")
    logs.announce(f"{result['mode']} on the {cfg.split} split, {size} images:\n{text}\n"
                  f"written: {out / 'metrics.json'}, {out / 'metrics.md'}, {out / 'roc.png'}", rt.main)
    return result


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, l2: float) -> np.ndarray:
    """Multi-label logistic regression on standardised features (full-batch L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.tensor((train_x - mean) / std, dtype=torch.float64)
    y = torch.tensor(np.nan_to_num(train_y), dtype=torch.float64)
    valid = torch.tensor(~np.isnan(train_y), dtype=torch.float64)
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt_ = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt_.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")
        loss = (bce * valid).sum() / valid.sum().clamp(min=1) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt_.step(closure)
    with torch.no_grad():
        logits = torch.tensor((eval_x - mean) / std, dtype=torch.float64) @ w + b
    return torch.sigmoid(logits).numpy()




if __name__ == "__main__":
    main()
