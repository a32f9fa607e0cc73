"""The hot ops of the ViT, behind one dispatch point.

Models call ``cxrfast.ops`` for attention, (residual +) LayerNorm and the MAE loss. Each op
has a plain torch implementation (the reference) and a Triton kernel in ``kernels/``.
``CXRFAST_OPS=auto`` (default) uses the kernels on CUDA tensors and torch elsewhere;
``torch`` forces the references; ``triton`` forces the kernels (on CPU that needs
``TRITON_INTERPRET=1``, which is how the tests run them). Kernels are imported lazily, so
importing cxrfast never touches Triton or a GPU.
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


def _use_kernel(t: torch.Tensor) -> bool:
    """Kernels on CUDA tensors under 'auto'; everywhere under 'triton' (CPU needs
    TRITON_INTERPRET=1); never under 'torch'."""
    if _backend == "torch":
        return False
    return _backend == "triton" or t.is_cuda


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention; q, k, v are (B, H, N, D), returns (B, H, N, D)."""
    if _use_kernel(q):
        from kernels.attention import attention as kernel
        from kernels.attention import fits

        if fits(q.shape[2], q.shape[-1], q.dtype, device=q.device):  # else over this GPU's shared memory: SDPA
            return kernel(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    if _use_kernel(x) and x.shape[-1] <= 8192:
        from kernels.layernorm import layer_norm as kernel

        return kernel(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(x + residual), x + residual) in one pass: the pre-norm block's add + norm."""
    if _use_kernel(x) and x.shape[-1] <= 8192:
        from kernels.layernorm import layer_norm as kernel

        return kernel(x, weight, bias, eps, residual=residual)
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


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
    if _use_kernel(pred):
        from kernels.mae_loss import mae_loss as kernel

        return kernel(pred, imgs, mask, patch_size, norm_pix, eps)
    return mae_loss_torch(pred, imgs, mask, patch_size, norm_pix, eps)


def mae_loss_torch(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The torch implementation of :func:`mae_loss` (and the kernel's reference)."""
    target = patchify(imgs, patch_size).to(pred.dtype)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()
