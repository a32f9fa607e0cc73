"""PNG figures: MAE reconstructions during pretraining, ROC curves after evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxrfast.atomic import atomic_open


COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible patches")
TEXT_SIZE = 11  # pixels: PIL's default font, readable at the demo's 128-pixel tiles
PAD = 2  # black border around each tile


def reconstruction_caption(norm_pix_loss: bool, mask_ratio: float) -> str:
    """What a reader must know to judge the picture: how much was hidden and, under
    norm_pix_loss, that the shown reconstruction borrowed each patch's true statistics."""
    text = f"{100 * mask_ratio:.0f}% of the patches hidden from the encoder (black in the masked input)."
    if norm_pix_loss:
        text += (" norm_pix_loss: the model predicts each patch normalised to zero mean and unit variance; the "
                 "reconstruction is de-normalised with the true mean and variance of each patch of the original "
                 "(hidden ones included), so its brightness and contrast are not the model's.")
    return text


def _to_uint8(x: torch.Tensor, mean: float, std: float) -> np.ndarray:
    img = (x.float() * std + mean).clamp(0, 1)
    return (img.mean(0).cpu().numpy() * 255).round().astype(np.uint8)


def _wrap(text: str, font, width: int) -> list[str]:
    """Words in lines no wider than ``width`` pixels (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _text_block(texts: list[str], width: int, font) -> np.ndarray:
    """White text on black, ``texts`` side by side in equal columns spanning ``width`` pixels."""
    from PIL import Image, ImageDraw

    column = width // len(texts)
    wrapped = [_wrap(t, font, column - 2 * PAD) for t in texts]
    line = TEXT_SIZE + 3
    block = Image.new("L", (width, max(map(len, wrapped)) * line + 2 * PAD), 0)
    draw = ImageDraw.Draw(block)
    for k, lines in enumerate(wrapped):
        for j, text in enumerate(lines):
            draw.text((k * column + PAD, PAD + j * line), text, fill=255, font=font)
    return np.asarray(block)


def reconstruction_grid(imgs: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor, patch: int,
                        path: Path, mean: float, std: float, caption: str | None = None) -> Path:
    """A PNG with a header row naming the columns (original | masked input | reconstruction |
    reconstruction with the visible patches pasted back), one row per image, and ``caption``
    (e.g. :func:`reconstruction_caption`) below; written atomically.

    ``imgs`` and ``recon`` are normalised (B, C, H, W) tensors, ``mask`` (B, patches) with 1
    for a hidden patch; ``mean`` and ``std`` undo the normalisation for display."""
    from PIL import Image, ImageFont

    b, c, h, w = imgs.shape
    gw = w // patch
    pixel_mask = mask.reshape(b, h // patch, gw).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    pixel_mask = pixel_mask[:, None].to(imgs.dtype)
    masked = imgs * (1 - pixel_mask) + pixel_mask * ((0.0 - mean) / std)  # hidden patches shown black
    pasted = imgs * (1 - pixel_mask) + recon * pixel_mask
    rows = []
    for i in range(b):
        tiles = [_to_uint8(t[i], mean, std) for t in (imgs, masked, recon, pasted)]
        rows.append(np.concatenate([np.pad(t, PAD) for t in tiles], axis=1))
    font = ImageFont.load_default(size=TEXT_SIZE)
    width = rows[0].shape[1]
    parts = [_text_block(list(COLUMNS), width, font), *rows]
    if caption:
        parts.append(_text_block([caption], width, font))
    sheet = np.concatenate(parts, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        Image.fromarray(sheet).save(f, format="PNG")
    return path


def _axes(title: str, xlabel: str, ylabel: str):
    """A square matplotlib figure (Agg backend: no display needed) with its labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 6.4), dpi=100)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    return fig, ax


def _finish(fig, ax, path: Path, notes: dict[str, str], loc: str) -> Path:
    """Legend (with one text-only entry per class that has no curve, saying why), atomic save."""
    import matplotlib.pyplot as plt

    for name, why in notes.items():
        ax.plot([], [], " ", label=f"{name}: {why}")
    ax.legend(loc=loc, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str = "ROC",
               notes: dict[str, str] | None = None) -> Path:
    """One ROC curve per class {name: (fpr, tpr, auroc)}, the chance diagonal, and a legend
    entry per class in ``notes`` ({name: "no positives in test"}); written atomically."""
    fig, ax = _axes(title, "false positive rate (1 - specificity)", "true positive rate (sensitivity)")
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance (AUROC 0.5)")
    return _finish(fig, ax, path, notes or {}, "lower right")


def pr_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float, float]], path: Path, title: str = "PR",
              notes: dict[str, str] | None = None) -> Path:
    """One precision-recall step curve per class {name: (recall, precision, auprc, prevalence)},
    each with its chance line (precision = prevalence, dashed in its colour); written atomically."""
    fig, ax = _axes(title, "recall (sensitivity)", "precision (positive predictive value)")
    for name, (recall, precision, ap, prevalence) in curves.items():
        line, = ax.plot(np.r_[0.0, recall], np.r_[precision[:1], precision], drawstyle="steps-pre", lw=1.5,
                        label=f"{name} (AUPRC {ap:.3f})")
        ax.axhline(prevalence, color=line.get_color(), ls="--", lw=0.8, label=f"{name} chance ({prevalence:.3f})")
    return _finish(fig, ax, path, notes or {}, "upper right")


def reliability_figure(bins: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]], path: Path,
                       title: str = "calibration", notes: dict[str, str] | None = None) -> Path:
    """Reliability diagram: per class {name: (mean probability, observed frequency, images,
    brier)} of each non-empty bin, against the diagonal of perfect calibration."""
    fig, ax = _axes(title, "mean predicted probability", "observed frequency of positives")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    for name, (mean_p, observed, count, score) in bins.items():
        ax.plot(mean_p, observed, marker="o", ms=3, lw=1.2, label=f"{name} (Brier {score:.4f})")
    return _finish(fig, ax, path, notes or {}, "upper left")
