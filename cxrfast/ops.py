"""The hot ops of the ViT, behind one dispatch point.

Models call ``cxrfast.ops`` for attention, LayerNorm and the MAE loss. Today each op has a
plain torch implementation (the reference); the Triton kernels of ``kernels/`` plug in here,
so the models never change. ``CXRFAST_OPS=torch`` forces the references; ``triton`` forces
the kernels; ``auto`` (default) uses kernels on CUDA tensors where they exist.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("CXRFAST_OPS", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"CXRFAST_OPS must be one of {_BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """Chooses the op implementations: 'auto', 'torch' (references) or 'triton'."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention; q, k, v are (B, H, N, D), returns (B, H, N, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


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


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over masked patches (mask: (B, L), 1 = masked), as in
    facebookresearch/mae; with ``norm_pix`` each target patch is normalised by its own mean
    and unbiased variance: (t - mean) / sqrt(var + eps)."""
    target = patchify(imgs, patch_size).to(pred.dtype)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()
