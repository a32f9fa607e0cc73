"""Fused (residual +) LayerNorm over the last dimension: Triton kernels, the ``cxrfast::layer_norm``
and ``cxrfast::add_layer_norm`` ops (kernel or torch reference), torch reference.

Design limits: hidden size N <= 8192 (one row per program, the row held in registers as a
power-of-two block, any N including non-powers of two); inputs fp32, bf16 or fp16;
statistics, dW and dB always accumulated in fp32. With ``residual``, ``h = x + residual``
is formed, normalised and returned in the same pass: ``(layer_norm(h), h)`` — the pre-norm
transformer pattern, saving one read and one write of the activations.

Dtypes follow torch: ``h`` and ``y`` take the promoted dtype of ``x`` and ``residual``
(``torch.result_type``), so a bf16 branch added to an fp32 residual stream keeps the stream
in fp32. ``h`` is rounded to that dtype before the statistics are taken, so forward and
backward see exactly the values torch's ``x + residual`` would hold. The gradients of ``x``
and ``residual`` come back in their own dtypes.

Backward: one program per block of rows computes dx for its rows and fp32 partial sums of
dW and dB; the partials (programs x N) are summed in fp32 by torch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels.launch import Config
from kernels.library import define, no_autocast

MAX_N = 8192


@triton.jit
def _ln_fwd(X, R, BB, Y, H, W, B, MEAN, RSTD,  # X, R, Y, H: (M, N) rows; BB, W, B: (N,); MEAN, RSTD: (M,) fp32
            stride_x, stride_r, stride_y, stride_h, N, eps,
            HAS_RES: tl.constexpr, HAS_BB: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(H.dtype.element_ty)
    if HAS_BB:  # the branch's bias (its Linear ran without one): (x + bias) + residual
        x += tl.load(BB + cols, mask=mask, other=0.0).to(H.dtype.element_ty)
    if HAS_RES:  # added in h's (promoted) dtype and rounded there, as torch's x + residual is
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd(X, DY, DH, DX, DX2, W, MEAN, RSTD, DW_PART, DB_PART, DBB_PART,  # X: saved input (h), (M, N)
            stride_x, stride_dy, stride_dh, stride_dx, stride_dx2, M, N, rows_per_program,
            HAS_DH: tl.constexpr, HAS_DX2: tl.constexpr, HAS_BB: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbb = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_program
    for row in range(start, tl.minimum(start + rows_per_program, M)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:  # the same gradient in the 16-bit branch's dtype (no separate cast pass)
            tl.store(DX2 + row * stride_dx2 + cols, dx.to(DX2.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        if HAS_BB:  # the branch bias's gradient: column sums of dx, in fp32
            dbb += dx
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    tl.store(DB_PART + pid * N + cols, db, mask=mask)
    if HAS_BB:
        tl.store(DBB_PART + pid * N + cols, dbb, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_config(n: int) -> Config:
    """BLOCK_N, warps and stages of both kernels for hidden size n (the one place they are
    chosen; bench/gpu_static.py compiles what this returns)."""
    if n > MAX_N:
        raise ValueError(f"hidden size {n} exceeds the kernel's limit {MAX_N}")
    block = triton.next_power_of_2(n)
    # 2-4 elements per thread: with 2 warps at n = 512 the fused backward (which also writes
    # the branch's 16-bit dx) spilled 8 bytes on sm_80, and with 8 warps at n = 768-1024 the
    # one summing a branch bias spilled 4 bytes on sm_90 (bench/gpu_static.py)
    return Config({"BLOCK_N": block}, min(max(block // 64, 4), 16), 3)


def bwd_grid(m: int, on_gpu: bool) -> tuple[int, int]:
    """(programs, rows_per_program) of the backward for m rows: ~1024 programs on a GPU,
    a few under the interpreter."""
    programs = max(1, min(m, 1024 if on_gpu else 8))
    rows_per_program = triton.cdiv(m, programs)
    return triton.cdiv(m, rows_per_program), rows_per_program


def _forward(x, weight, bias, eps, residual, out_dtype=None, branch_bias=None):
    shape = x.shape
    x2 = _rows(x)
    m, n = x2.shape
    r2 = _rows(residual) if residual is not None else x2
    dtype = torch.result_type(x, residual) if residual is not None else x.dtype
    y = torch.empty_like(x2, dtype=out_dtype or dtype)
    h = torch.empty_like(x2, dtype=dtype) if residual is not None else x2
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    bb = branch_bias if branch_bias is not None else weight
    _ln_fwd[(m,)](x2, r2, bb, y, h, weight, bias, mean, rstd, x2.stride(0), r2.stride(0), y.stride(0),
                  h.stride(0), n, eps, HAS_RES=residual is not None, HAS_BB=branch_bias is not None,
                  **launch_config(n).kwargs())
    return y.view(shape), h.view(shape), mean, rstd


def _backward(dy, dh, saved, weight, mean, rstd, branch_dtype=None, branch_bias_dtype=None):
    """(dx in saved's dtype, dx in branch_dtype or an empty tensor, dweight, dbias, the branch
    bias's gradient in branch_bias_dtype or an empty tensor)."""
    shape = dy.shape
    dy2 = _rows(dy)
    x2 = _rows(saved)
    m, n = x2.shape
    dh2 = _rows(dh) if dh is not None else dy2
    dx = torch.empty_like(x2)
    dx2 = torch.empty_like(x2, dtype=branch_dtype) if branch_dtype is not None else dx.new_empty(0)
    programs, rows_per_program = bwd_grid(m, x2.is_cuda)
    dw_part = torch.empty(programs, n, dtype=torch.float32, device=dy.device)
    db_part = torch.empty(programs, n, dtype=torch.float32, device=dy.device)
    has_bb = branch_bias_dtype is not None
    dbb_part = torch.empty(programs, n, dtype=torch.float32, device=dy.device) if has_bb else db_part
    _ln_bwd[(programs,)](x2, dy2, dh2, dx, dx2 if branch_dtype is not None else dx, weight, mean, rstd, dw_part,
                         db_part, dbb_part, x2.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0), n, m, n,
                         rows_per_program, HAS_DH=dh is not None, HAS_DX2=branch_dtype is not None, HAS_BB=has_bb,
                         **launch_config(n).kwargs())
    dx2 = dx2.view(shape) if branch_dtype is not None else dx2
    dbb = dbb_part.sum(0).to(branch_bias_dtype) if has_bb else dx.new_empty(0)
    return dx.view(shape), dx2, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype), dbb


def _stats_dtype(dtype: torch.dtype, kernel: bool) -> torch.dtype:
    """Mean and rstd: fp32 from the kernel; at least fp32 (fp64 for fp64) from the reference."""
    return torch.float32 if kernel else torch.promote_types(dtype, torch.float32)


def _forward_ref(h, weight, bias, eps, out_dtype=None):
    """The kernel's forward in plain torch: statistics of h in (at least) fp32, y in h's dtype
    (or out_dtype)."""
    with no_autocast(h.device):
        cdt = torch.promote_types(h.dtype, torch.float32)
        hc = h.to(cdt)
        mean = hc.mean(-1, keepdim=True)
        rstd = torch.rsqrt((hc - mean).square().mean(-1, keepdim=True) + eps)
        y = ((hc - mean) * rstd * weight.to(cdt) + bias.to(cdt)).to(out_dtype or h.dtype).contiguous()
        return y, mean.reshape(-1), rstd.reshape(-1)


def _backward_ref(dy, dh, saved, weight, mean, rstd, branch_dtype=None, branch_bias_dtype=None):
    """The kernel's backward in plain torch (same formula, in at least fp32)."""
    with no_autocast(saved.device):
        cdt = mean.dtype
        n = saved.shape[-1]
        h2, dy2 = saved.reshape(-1, n).to(cdt), dy.reshape(-1, n).to(cdt)
        xhat = (h2 - mean[:, None]) * rstd[:, None]
        wdy = weight.to(cdt) * dy2
        c1 = (xhat * wdy).mean(-1, keepdim=True)
        c2 = wdy.mean(-1, keepdim=True)
        dx = (wdy - (xhat * c1 + c2)) * rstd[:, None]
        if dh is not None:
            dx = dx + dh.reshape(-1, n).to(cdt)
        dw, db = (dy2 * xhat).sum(0), dy2.sum(0)
        dx2 = dx.to(branch_dtype).reshape(saved.shape) if branch_dtype is not None else dx.new_empty(0)
        dbb = dx.sum(0).to(branch_bias_dtype) if branch_bias_dtype is not None else dx.new_empty(0)
        return dx.to(saved.dtype).reshape(saved.shape), dx2, dw.to(weight.dtype), db.to(weight.dtype), dbb


def _ln_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype],
             kernel: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) of LayerNorm(x); y in out_dtype when given."""
    if kernel:
        y, _, mean, rstd = _forward(x, weight, bias, eps, None, out_dtype)
        return y, mean, rstd
    return _forward_ref(x, weight, bias, eps, out_dtype)


def _add_ln_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                 out_dtype: Optional[torch.dtype], branch_bias: Optional[torch.Tensor], kernel: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd) of LayerNorm(h), h = (x + branch_bias) + residual in the promoted
    dtype of x and residual."""
    if kernel:
        return _forward(x, weight, bias, eps, residual, out_dtype, branch_bias)
    dtype = torch.result_type(x, residual)
    branch = x.to(dtype) if branch_bias is None else x.to(dtype) + branch_bias.to(dtype)
    h = (branch + residual.to(dtype)).contiguous()
    y, mean, rstd = _forward_ref(h, weight, bias, eps, out_dtype)
    return y, h, mean, rstd


def _ln_bwd_impl(dy: torch.Tensor, dh: Optional[torch.Tensor], saved: torch.Tensor, weight: torch.Tensor,
                 mean: torch.Tensor, rstd: torch.Tensor, branch_dtype: Optional[torch.dtype],
                 branch_bias_dtype: Optional[torch.dtype], kernel: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in saved's dtype, dx in branch_dtype (empty when None), dweight, dbias, the branch
    bias's gradient (empty when branch_bias_dtype is None))."""
    if kernel:
        return _backward(dy, dh, saved, weight, mean, rstd, branch_dtype, branch_bias_dtype)
    return _backward_ref(dy, dh, saved, weight, mean, rstd, branch_dtype, branch_bias_dtype)


def _fake_out(x, dtype, out_dtype, kernel):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    sdt = _stats_dtype(dtype, kernel)
    return (x.new_empty(x.shape, dtype=out_dtype or dtype), x.new_empty((m,), dtype=sdt),
            x.new_empty((m,), dtype=sdt))


def _ln_fake(x, weight, bias, eps, out_dtype, kernel):
    return _fake_out(x, x.dtype, out_dtype, kernel)


def _add_ln_fake(x, residual, weight, bias, eps, out_dtype, branch_bias, kernel):
    dtype = torch.result_type(x, residual)
    y, mean, rstd = _fake_out(x, dtype, out_dtype, kernel)
    return y, x.new_empty(x.shape, dtype=dtype), mean, rstd


def _ln_bwd_fake(dy, dh, saved, weight, mean, rstd, branch_dtype, branch_bias_dtype, kernel):
    dx2 = saved.new_empty(saved.shape, dtype=branch_dtype) if branch_dtype is not None else saved.new_empty(0)
    dbb = (saved.new_empty(saved.shape[-1:], dtype=branch_bias_dtype) if branch_bias_dtype is not None
           else saved.new_empty(0))
    return saved.new_empty(saved.shape), dx2, torch.empty_like(weight), torch.empty_like(weight), dbb


ln_backward_op = define("layer_norm_backward", _ln_bwd_impl, _ln_bwd_fake)


def _ln_setup(ctx, inputs, output):
    x, weight, _, _, _, kernel = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients built for mean and rstd
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.kernel = kernel


def _ln_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, _, dw, db, _ = ln_backward_op(dy, None, x, weight, mean, rstd, None, None, ctx.kernel)
    return dx, dw, db, None, None, None


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, _, _, _, branch_bias, kernel = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused y or h sends None, not a zero tensor
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.kernel = kernel
    ctx.dtypes = (x.dtype, residual.dtype, branch_bias.dtype if branch_bias is not None else None)


def _add_ln_grad(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)  # only h was used: the kernel still passes dh through
    x_dtype, residual_dtype, bias_dtype = ctx.dtypes  # each input gets its gradient back in its own dtype
    # The kernel writes the gradient once in h's dtype and once in the other input's (a 16-bit
    # branch beside an fp32 stream), instead of a separate cast pass; with a branch bias it
    # also sums that bias's gradient in the same pass.
    other = x_dtype if x_dtype != h.dtype else residual_dtype if residual_dtype != h.dtype else None
    dx, dx_other, dw, db, dbb = ln_backward_op(dy, dh, h, weight, mean, rstd, other, bias_dtype, ctx.kernel)
    grads = [dx_other if d == other else dx if d == h.dtype else dx.to(d) for d in (x_dtype, residual_dtype)]
    return grads[0], grads[1], dw, db, None, None, dbb if bias_dtype is not None else None, None


ln_op = define("layer_norm", _ln_impl, _ln_fake, _ln_grad, _ln_setup)
add_ln_op = define("add_layer_norm", _add_ln_impl, _add_ln_fake, _add_ln_grad, _add_ln_setup)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
               residual: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
               branch_bias: torch.Tensor | None = None, kernel: bool = True):
    """LayerNorm of x (or of h = x + residual, returning (LN(h), h)) over the last dim, as
    the ops ``cxrfast::layer_norm`` / ``cxrfast::add_layer_norm``.

    x, residual: (..., N) fp32/bf16/fp16 (fp64 is accepted and stored, statistics still fp32);
    weight, bias: (N,). y and h are contiguous, in ``torch.result_type(x, residual)``; y in
    ``out_dtype`` when given (under autocast the bf16 a following matmul would cast y to: the
    same rounding, without writing fp32 and casting it). ``branch_bias`` (N,), with a residual
    only: the bias of the Linear that produced x (run without it), added in h's dtype, its
    gradient summed by the same backward pass. ``kernel=False`` runs the same op's torch
    reference (any device, any N).
    """
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError("weight and bias must be (N,) for x of shape (..., N)")
    if branch_bias is not None and (residual is None or branch_bias.shape != (x.shape[-1],)):
        raise ValueError("branch_bias must be (N,) and needs a residual")
    if kernel and x.shape[-1] > MAX_N:
        raise ValueError(f"hidden size {x.shape[-1]} exceeds the kernel's limit {MAX_N}")
    if residual is not None:
        y, h, _, _ = add_ln_op(x, residual, weight, bias, float(eps), out_dtype, branch_bias, kernel)
        return y, h
    return ln_op(x, weight, bias, float(eps), out_dtype, kernel)[0]


def layer_norm_ref(x, weight, bias, eps=1e-6, residual=None, upcast=False):
    """Plain torch reference (optionally computed in fp32 and cast back to the promoted dtype)."""
    dtype = torch.result_type(x, residual) if residual is not None else x.dtype
    if upcast:
        x, weight, bias = x.float(), weight.float(), bias.float()
        residual = residual.float() if residual is not None else None
    h = x + residual if residual is not None else x
    y = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    if residual is not None:
        return y.to(dtype), h.to(dtype)
    return y.to(dtype)
