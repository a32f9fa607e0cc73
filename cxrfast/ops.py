"""The hot ops of the ViT, behind one dispatch point.

Models call ``cxrfast.ops`` for attention (the ViT on its packed qkv projection:
``attention_qkv``), (residual +) LayerNorm, the MLP, the MAE decoder's unshuffle and the MAE
loss. Each op
is a ``cxrfast::`` torch custom op (``kernels/``) that runs either its Triton kernel or its
plain torch reference. ``CXRFAST_OPS=auto`` (default) runs the kernels' custom ops on CUDA
tensors and plain torch functions elsewhere (SDPA and ``F.layer_norm`` are faster on CPU than
the ops' explicit-softmax references: 2.1x on a vit_tiny MAE step); ``reference`` runs the
custom ops with their torch references on any device (so a CPU ``torch.compile`` sees the GPU
step's graph: the 0-graph-break test uses it); ``torch`` uses plain torch functions, no custom
op; ``triton`` forces the kernels (on CPU that needs ``TRITON_INTERPRET=1``, which is how the
tests run them).
Kernels are imported lazily, at the first op call, so importing cxrfast never imports
Triton; nothing touches a GPU or compiles before a kernel runs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels.patches import mae_loss_ref, patchify, unpatchify  # noqa: F401  (patchify/unpatchify re-exported)

_BACKENDS = ("auto", "torch", "triton", "reference")
_backend = os.environ.get("CXRFAST_OPS", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"CXRFAST_OPS must be one of {_BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """Chooses the op implementations: 'auto', 'torch', 'triton' or 'reference' (see the module)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


_kernels_ok: bool | None = None


def _kernels_importable() -> bool:
    """Whether kernels/ imports (it needs Triton, a Linux-only dependency); asked once. A plain
    cached global, not functools.lru_cache: Dynamo traces through that wrapper and warns."""
    global _kernels_ok
    if _kernels_ok is None:
        try:
            import kernels.attention, kernels.layernorm, kernels.mae_loss, kernels.mlp  # noqa: F401, E401
            _kernels_ok = True
        except ImportError:
            _kernels_ok = False
    return _kernels_ok


def _kernel_flag(t: torch.Tensor) -> bool | None:
    """The ``kernel`` argument of the ``cxrfast::`` op to call: True (the Triton kernel) on CUDA
    under 'auto' and everywhere under 'triton' (CPU needs TRITON_INTERPRET=1); False (the op's
    torch reference) under 'reference'; None (plain torch functions, no custom op) under
    'torch', on CPU under 'auto', and without Triton."""
    if _backend == "torch" or not _kernels_importable():
        return None
    if _backend == "reference":
        return False
    if _backend == "auto" and not t.is_cuda:
        return None
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention; q, k, v are (B, H, N, D), returns (B, H, N, D)."""
    kernel = _kernel_flag(q)
    if kernel is not None and _use_kernel_op(kernel, q.shape[2], q.shape[-1], q):
        from kernels import attention as ka

        return ka.attention(q, k, v, scale=scale, kernel=kernel)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def matmul_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to before a matmul on its device; None outside autocast.
    A LayerNorm whose output feeds a matmul writes that dtype directly (same rounding, no
    fp32 write and cast pass)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return None


def _exact_fp32_on_gpu(dtype: torch.dtype) -> bool:
    """Whether auto should leave an op to torch on a GPU: the kernels' fp32 mode is exact IEEE
    fp32 (no tensor cores; the attention tiles spill kilobytes there: gpu_static), a reference
    mode, not a fast path."""
    return _backend == "auto" and dtype == torch.float32


def _use_kernel_op(kernel: bool, n: int, d: int, t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the attention custom op runs (else SDPA): always with its reference; with the
    kernel unless it is over this GPU's shared memory, or fp32 on a GPU under auto (the
    kernel's IEEE fp32 tiles spill kilobytes there: gpu_static). ``dtype``: q, k, v's dtype
    when ``t`` is not one of them (the projection's input, before autocast's cast)."""
    from kernels import attention as ka

    if not kernel:
        return True
    dtype = dtype or t.dtype
    return not _exact_fp32_on_gpu(dtype) and ka.fits(n, d, dtype, device=t.device)


def attention_qkv(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention on the packed qkv projection: qkv (B, N, 3*H*D) as the
    qkv Linear gives it (thirds q, k, v; heads inside each), returns (B, N, H*D), the layout
    the output projection reads. The custom op reads q, k, v and writes o and dqkv in place
    through strides (no permute/select copies); the plain torch path uses SDPA."""
    b, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    kernel = _kernel_flag(qkv)
    if kernel is not None and _use_kernel_op(kernel, n, d, qkv):
        from kernels import attention as ka

        return ka.attention_qkv(qkv, num_heads, scale=scale, kernel=kernel)
    q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(-1, (3, num_heads, d)).unbind(2))
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return o.transpose(1, 2).reshape(b, n, num_heads * d)


def qkv_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, *,
                  scale: float | None = None) -> torch.Tensor:
    """The qkv Linear (``weight``, ``bias``) and attention on its packed output: x (B, N, dim) ->
    (B, N, dim). On the custom op the bias gradient comes from the attention backward kernel's
    own token sums (no reduction pass over dqkv); elsewhere it is plain Linear + attention."""
    n, d = x.shape[1], weight.shape[0] // (3 * num_heads)
    kernel = _kernel_flag(x)
    if kernel is not None and _use_kernel_op(kernel, n, d, x, matmul_dtype(x) or x.dtype):
        from kernels import attention as ka

        return ka.qkv_attention(x, weight, bias, num_heads, scale=scale, kernel=kernel)
    return attention_qkv(F.linear(x, weight, bias), num_heads, scale=scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension, the result in ``out_dtype`` when given."""
    kernel = _kernel_flag(x)
    if kernel is not None:
        from kernels import layernorm as kln

        if x.shape[-1] <= kln.MAX_N:
            return kln.layer_norm(x, weight, bias, eps, out_dtype=out_dtype, kernel=kernel)
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6, out_dtype: torch.dtype | None = None,
                   branch_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(h), h) for h = (x + branch_bias) + residual, in one pass: the pre-norm
    block's add + norm; the first in ``out_dtype`` when given. ``branch_bias`` is the bias of
    the Linear that made x, run without it (its gradient then comes from this op's backward
    pass instead of a separate sum over x's gradient)."""
    kernel = _kernel_flag(x)
    if kernel is not None:
        from kernels import layernorm as kln

        if x.shape[-1] <= kln.MAX_N:
            return kln.layer_norm(x, weight, bias, eps, residual=residual, out_dtype=out_dtype,
                                  branch_bias=branch_bias, kernel=kernel)
    if branch_bias is not None:
        x = x + branch_bias
    h = x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return (y if out_dtype is None else y.to(out_dtype)), h


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """fc2(gelu(fc1(x))) with the exact GELU; x (..., d_in), weights in nn.Linear layouts.
    The kernel fuses the GELU and fc1's bias gradient into the GEMMs (kernels/mlp.py); fp32
    on a GPU under auto goes to cuBLAS (the kernel's exact fp32 mode has no tensor cores)."""
    kernel = _kernel_flag(x)
    if kernel is not None:
        from kernels import mlp as kmlp

        if not kernel or not _exact_fp32_on_gpu(kmlp.op_dtype(x, w1)):
            return kmlp.mlp(x, w1, b1, w2, b2, kernel=kernel)
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def mae_unshuffle(x: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor,
                  ids_restore: torch.Tensor) -> torch.Tensor:
    """The MAE decoder input (B, 1 + L, D): x (B, 1 + keep, D, CLS first) at positions
    [0, 1 + ids_keep], mask_token (1, 1, D) elsewhere, plus pos (1, 1 + L, D). The op
    ``cxrfast::mae_unshuffle`` (plain torch, any device, no full-size zeros or scatter in its
    backward) except under 'torch', which runs the cat + gather twin."""
    from kernels import masking  # no Triton needed

    fn = masking.unshuffle_ref if _backend == "torch" else masking.unshuffle
    return fn(x, mask_token, pos, ids_keep, ids_restore)


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over masked patches (mask: (B, L), 1 = masked), as in
    facebookresearch/mae; with ``norm_pix`` each target patch is normalised by its own mean
    and unbiased variance: (t - mean) / sqrt(var + eps). The torch reference is
    ``kernels.patches.mae_loss_ref``."""
    kernel = _kernel_flag(pred)
    if kernel is not None:  # kernels.mae_loss needs Triton; the reference below does not
        from kernels import mae_loss as kml

        if not kernel or pred.shape[-1] <= kml.MAX_P:
            return kml.mae_loss(pred, imgs, mask, patch_size, norm_pix, eps, kernel=kernel)
    return mae_loss_ref(pred, imgs, mask, patch_size, norm_pix, eps)
