"""Patches of an image batch in facebookresearch/mae's layout, shared by the MAE loss kernel's
reference and the model (plain torch: importing it needs no Triton)."""
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
