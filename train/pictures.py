"""PNG figures: MAE reconstructions during pretraining, ROC curves after evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxrfast.atomic import atomic_open


def _to_uint8(x: torch.Tensor, mean: float, std: float) -> np.ndarray:
    img = (x.float() * std + mean).clamp(0, 1)
    return (img.mean(0).cpu().numpy() * 255).round().astype(np.uint8)


def reconstruction_grid(imgs: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor, patch: int,
                        path: Path, mean: float, std: float) -> Path:
    """Rows of original | masked input | reconstruction | reconstruction with visible patches
    pasted back, one row per image; written atomically."""
    from PIL import Image

    b, c, h, w = imgs.shape
    gw = w // patch
    pixel_mask = mask.reshape(b, h // patch, gw).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    pixel_mask = pixel_mask[:, None].to(imgs.dtype)
    masked = imgs * (1 - pixel_mask) + pixel_mask * ((0.0 - mean) / std)  # hidden patches shown black
    pasted = imgs * (1 - pixel_mask) + recon * pixel_mask
    rows = []
    for i in range(b):
        tiles = [_to_uint8(t[i], mean, std) for t in (imgs, masked, recon, pasted)]
        rows.append(np.concatenate([np.pad(t, 2) for t in tiles], axis=1))
    sheet = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        Image.fromarray(sheet).save(f, format="PNG")
    return path


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path) -> Path:
    """One ROC curve per class (fpr, tpr, auroc); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right", fontsize=8)
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
