"""Patches of an image batch in facebookresearch/mae's layout and the MAE loss's torch
reference: plain torch, so the model and the loss work where Triton is not installed (Triton is
a Linux-only dependency); ``kernels/mae_loss.py`` holds the fused kernel."""
from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, (row, col, channel) inside a patch
    (facebookresearch/mae's layout, for any channel count)."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, H, W)."""
    b = x.shape[0]
    p = patch_size
    gh, gw = grid
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def target(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, norm_pix: bool, eps: float) -> torch.Tensor:
    """The patchified target in pred's dtype, each patch normalised when ``norm_pix``."""
    t = patchify(imgs, patch_size).to(pred.dtype)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + eps) ** 0.5
    return t


def mae_loss_ref(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6):
    """Plain torch reference: patchify, normalise, MSE, masked mean (facebookresearch/mae),
    in pred's dtype; what cxrfast.ops runs when the kernel is not used (so it lives here, in
    a module that needs no Triton, beside the fused kernel's file)."""
    loss = ((pred - target(pred, imgs, patch_size, norm_pix, eps)) ** 2).mean(dim=-1)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


