"""The ViT MLP ``fc2(gelu(fc1(x)))`` with the exact (erf) GELU fused into its GEMMs: Triton
kernels, the ``cxrfast::mlp`` / ``cxrfast::mlp_backward`` ops (kernel or torch reference), and
a torch reference.

Why fused: a standalone GELU reads h and writes a (forward), reads dA and h and writes dh
(backward), and fc1's bias gradient reads dh once more; in the GEMM epilogues the same work
costs one extra store of h in the forward and one load of h in the backward, and da is never
materialised.

- forward kernel: ``h = x @ w1.T + b1``, ``a = gelu(h)``; writes h (saved for the backward)
  and a (fc2's input). fc2 is a torch ``addmm``.
- backward kernel: ``dh = (dz @ w2) * gelu'(h)`` (fc2's input-gradient GEMM, gelu' in the
  epilogue) and fp32 partial column sums of dh per row block (summed by torch: db1).
  dW2, db2, dW1 and dx are torch matmuls / sums.

Design limits: any M (rows = leading dims flattened), d_in, hidden and d_out (edges masked);
inputs fp32, bf16 or fp16, all five of one dtype (``mlp`` casts to the autocast dtype first,
as F.linear would); fp32 accumulation; fp32 runs with input_precision "ieee" (exact, no TF32:
the interpreter's mode and the exact mode on GPUs). h is rounded to the input dtype before
the GELU, so forward and backward see the h torch's ``fc1(x)`` would hold. db1 sums dh in
fp32 before it is rounded. Row offsets are int64; M x hidden may exceed 2**31.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from kernels.launch import Config, capability, smem_per_block
from kernels.library import define, nbytes, no_autocast

RSQRT2 = 0.7071067811865476  # 1 / sqrt(2)
RSQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
_RSQRT2: tl.constexpr = tl.constexpr(RSQRT2)  # the kernels read globals only as constexprs
_RSQRT_2PI: tl.constexpr = tl.constexpr(RSQRT_2PI)


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program pid, GROUP_M row blocks at a time so the
    programs running together share their weight tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _gemm(A, B, stride_am, stride_bk, stride_bn, M, N, K, pid_m, pid_n,
          PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A @ B (A rows contiguous in K); rows and columns past
    M and N wrap around (valid loads, garbage the caller masks), K is masked to zero."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    b_ptrs = B + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = ks < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _epilogue_offsets(pid_m, cols, M, N, stride, BLOCK_M: tl.constexpr):
    """int32 offsets of a tile within its row block (the block's start is added once, in
    int64: 32-bit offsets per element keep the epilogue's registers down) and its mask."""
    rows = tl.arange(0, BLOCK_M)
    mask = (rows < M - pid_m * BLOCK_M)[:, None] & (cols < N)[None, :]
    return rows[:, None] * stride + cols[None, :], mask


@triton.jit
def _mlp_fwd(X, W1, B1, H, A,  # X: (M, K) rows; W1: (N, K) rows; B1: (N,); H, A: (M, N) contiguous
             M, N, K, stride_xm, stride_wn, stride_hm,
             PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # B = W1^T: element (k, n) at W1 + n * stride_wn + k
    acc = _gemm(X, W1, stride_xm, 1, stride_wn, M, N, K, pid_m, pid_n, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bias = tl.load(B1 + cols, mask=cols < N, other=0.0).to(tl.float32)
    h = (acc + bias[None, :]).to(H.dtype.element_ty)  # rounded as torch's fc1(x) is
    hf = h.to(tl.float32)
    a = 0.5 * hf * (1.0 + tl.erf(hf * _RSQRT2))
    offs, mask = _epilogue_offsets(pid_m, cols, M, N, stride_hm, BLOCK_M)
    base = pid_m.to(tl.int64) * BLOCK_M * stride_hm
    tl.store(H + base + offs, h, mask=mask)
    tl.store(A + base + offs, a.to(A.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_bwd(DZ, W2, H, DH, DB_PART,  # DZ: (M, K) rows; W2: (K, N) rows; H, DH: (M, N); DB_PART: (cdiv(M, BLOCK_M), N) fp32
             M, N, K, stride_dzm, stride_wk, stride_hm,
             PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    da = _gemm(DZ, W2, stride_dzm, stride_wk, 1, M, N, K, pid_m, pid_n, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs, mask = _epilogue_offsets(pid_m, cols, M, N, stride_hm, BLOCK_M)
    base = pid_m.to(tl.int64) * BLOCK_M * stride_hm
    h = tl.load(H + base + offs, mask=mask, other=0.0).to(tl.float32)
    # gelu'(h) = Phi(h) + h * phi(h)
    grad = 0.5 * (1.0 + tl.erf(h * _RSQRT2)) + h * tl.exp(-0.5 * h * h) * _RSQRT_2PI
    dh = tl.where(mask, da * grad, 0.0)
    tl.store(DH + base + offs, dh.to(DH.dtype.element_ty), mask=mask)
    tl.store(DB_PART + pid_m * N + cols, tl.sum(dh, axis=0), mask=cols < N)


def _precision(dtype: torch.dtype):
    """fp32 multiplies in full fp32 (exact mode); 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else None


def _block(size: int, largest: int) -> int:
    """A power-of-two block, 16 to ``largest``, no wider than ``size`` needs."""
    return min(largest, max(16, triton.next_power_of_2(size)))


def launch_config(m: int, n: int, k: int, dtype: torch.dtype, cap: tuple[int, int] | None = None,
                  backward: bool = False) -> Config:
    """BLOCK_M/N/K, GROUP_M, warps and stages of the forward (or, with ``backward``, the
    backward) kernel for an (m, k) @ (k, n) GEMM on compute capability ``cap`` (default: the
    H100/H200 the project targets); the launches below and bench/gpu_static.py both call it.

    16-bit: 128 x 128 tiles on 8 warps for the forward (wgmma on sm_90, mma.sync elsewhere);
    128 x 64 for the backward, whose erf + exp epilogue on a 128 x 128 tile needs 255
    registers and spills on sm_90 (bench/gpu_static.py: 128 x 64 takes 128, no spill, two
    blocks per SM). BLOCK_K and stages: the deepest pipeline, (BLOCK_M + BLOCK_N) x BLOCK_K x
    stages elements, that fits the target's shared memory per block (less 4 KiB for barriers).
    fp32 ("ieee", CUDA cores and the interpreter): 64 x 64 x 32 on 4 warps, shrunk to small
    problems so the interpreter pads little."""
    cap = cap or (9, 0)
    if dtype == torch.float32:
        return Config({"BLOCK_M": _block(m, 64), "BLOCK_N": _block(n, 64), "BLOCK_K": _block(k, 32), "GROUP_M": 8},
                      4, 2)
    elem = torch.finfo(dtype).bits // 8
    block_m, block_n = _block(m, 128), _block(n, 64 if backward else 128)
    budget = smem_per_block(cap) - 4096
    for block_k, stages in ((64, 4), (64, 3), (32, 4), (32, 3), (32, 2), (16, 2)):
        if block_k <= _block(k, 64) and (block_m + block_n) * block_k * elem * stages <= budget:
            break
    return Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}, 8, stages)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with unit stride along the last dim."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(m: int, n: int, cfg: Config) -> tuple[int]:
    return (triton.cdiv(m, cfg.blocks["BLOCK_M"]) * triton.cdiv(n, cfg.blocks["BLOCK_N"]),)


def _forward(x, w1, b1, w2, b2):
    """The kernel's forward: (z (..., d_out), h (M, hidden), a (M, hidden)), all in x's dtype."""
    x2, w1c, w2c = _rows(x), w1.contiguous(), w2.contiguous()
    m, k = x2.shape
    n = w1c.shape[0]
    h = torch.empty(m, n, dtype=x.dtype, device=x.device)
    a = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        cfg = launch_config(m, n, k, x.dtype, capability(x.device))
        _mlp_fwd[_grid(m, n, cfg)](x2, w1c, b1.contiguous(), h, a, m, n, k, x2.stride(0), w1c.stride(0), h.stride(0),
                                   PREC=_precision(x.dtype), **cfg.kwargs())
    with no_autocast(x.device):
        z = torch.addmm(b2, a, w2c.t())
    return z.view(*x.shape[:-1], w2.shape[0]), h, a


def _backward(dz, x, w1, w2, h, a):
    """The kernel's backward: (dx, dw1, db1, dw2, db2) in the dtypes of x, w1, w1, w2, w2."""
    dz2, x2, w2c = _rows(dz), _rows(x), w2.contiguous()
    m, n = h.shape
    d_out = w2c.shape[0]
    dh = torch.empty(m, n, dtype=h.dtype, device=h.device)
    cfg = launch_config(m, n, d_out, h.dtype, capability(h.device), backward=True)
    parts = torch.empty(triton.cdiv(m, cfg.blocks["BLOCK_M"]), n, dtype=torch.float32, device=h.device)
    if m:
        _mlp_bwd[_grid(m, n, cfg)](dz2, w2c, h, dh, parts, m, n, d_out, dz2.stride(0), w2c.stride(0), h.stride(0),
                                   PREC=_precision(h.dtype), **cfg.kwargs())
    with no_autocast(x.device):
        dx = (dh @ w1.to(dh.dtype)).view(x.shape).to(x.dtype)
        dw1 = (dh.t() @ x2.to(dh.dtype)).to(w1.dtype)
        dw2 = (dz2.t() @ a.to(dz2.dtype)).to(w2.dtype)
        db2 = dz2.sum(0, dtype=torch.promote_types(dz2.dtype, torch.float32)).to(w2.dtype)
    return dx, dw1, parts.sum(0).to(w1.dtype), dw2, db2


def gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d gelu(h) / dh of the exact GELU: Phi(h) + h * phi(h)."""
    return 0.5 * (1.0 + torch.erf(h * RSQRT2)) + h * torch.exp(-0.5 * h * h) * RSQRT_2PI


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _forward_ref(x, w1, b1, w2, b2):
    """The kernel's forward in plain torch: fc1 accumulated in (at least) fp32, h rounded to
    x's dtype, the GELU of that h, fc2 as addmm in x's dtype."""
    with no_autocast(x.device):
        cdt = _compute_dtype(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.addmm(b1.to(cdt), x2.to(cdt), w1.to(cdt).t()).to(x.dtype)
        a = torch.nn.functional.gelu(h.to(cdt)).to(x.dtype)
        z = torch.addmm(b2.to(x.dtype), a, w2.to(x.dtype).t())
        return z.view(*x.shape[:-1], w2.shape[0]), h, a


def _backward_ref(dz, x, w1, w2, h, a):
    """The kernel's backward in plain torch (same formulas; dh and db1 from fp32 values)."""
    with no_autocast(x.device):
        cdt = _compute_dtype(h.dtype)
        dz2, x2 = dz.reshape(-1, dz.shape[-1]), x.reshape(-1, x.shape[-1])
        dh32 = (dz2.to(cdt) @ w2.to(cdt)) * gelu_grad(h.to(cdt))
        dh = dh32.to(h.dtype)
        dx = (dh @ w1.to(dh.dtype)).view(x.shape).to(x.dtype)
        dw1 = (dh.t() @ x2.to(dh.dtype)).to(w1.dtype)
        dw2 = (dz2.t() @ a.to(dz2.dtype)).to(w2.dtype)
        db2 = dz2.sum(0, dtype=_compute_dtype(dz2.dtype)).to(w2.dtype)
        return dx, dw1, dh32.sum(0).to(w1.dtype), dw2, db2


def _mlp_impl(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              kernel: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, h, a): z = fc2(a), a = gelu(h), h = fc1(x) with rows flattened."""
    if kernel:
        return _forward(x, w1, b1, w2, b2)
    return _forward_ref(x, w1, b1, w2, b2)


def _mlp_bwd_impl(dz: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor,
                  a: torch.Tensor, kernel: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2)."""
    if kernel:
        return _backward(dz, x, w1, w2, h, a)
    return _backward_ref(dz, x, w1, w2, h, a)


def _mlp_fake(x, w1, b1, w2, b2, kernel):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    hidden = x.new_empty((m, w1.shape[0]))
    return x.new_empty((*x.shape[:-1], w2.shape[0])), hidden, torch.empty_like(hidden)


def _mlp_bwd_fake(dz, x, w1, w2, h, a, kernel):
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[:1]), w2.new_empty(w2.shape),
            w2.new_empty(w2.shape[:1]))


def _mlp_traffic(args, out):
    """Forward: the fused kernel reads x, w1, b1 and writes h, a; fc2's addmm reads a, w2, b2 and
    writes z."""
    x, w1, b1, w2, b2 = args[:5]
    z, h, a = out
    return nbytes(x, w1, b1, a, w2, b2), nbytes(h, a, z)


def _mlp_bwd_traffic(args, out):
    """Backward: the kernel reads dz, w2, h and writes dh (and fp32 db1 partials, counted as
    one row block per 128 rows); dx = dh w1, dw1 = dh^T x, dw2 = dz^T a and db2 = sum(dz) each
    read their operands."""
    dz, x, w1, w2, h, a = args[:6]
    dx, dw1, db1, dw2, db2 = out
    parts = (h.numel() // max(h.shape[-1], 1) + 127) // 128 * h.shape[-1] * 4
    return (nbytes(dz, w2, h) + 2 * nbytes(h) + nbytes(w1, x, dz, a, dz) + parts,
            nbytes(h) + parts + nbytes(dx, dw1, dw2, db1, db2))


mlp_backward_op = define("mlp_backward", _mlp_bwd_impl, _mlp_bwd_fake, traffic=_mlp_bwd_traffic)


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, kernel = inputs
    _, h, a = output
    ctx.mark_non_differentiable(h, a)
    ctx.set_materialize_grads(False)  # no full-size zero gradients built for h and a
    ctx.save_for_backward(x, w1, w2, h, a)
    ctx.kernel = kernel
    ctx.bias_dtypes = (b1.dtype, b2.dtype)


def _mlp_grad(ctx, dz, _dh, _da):
    x, w1, w2, h, a = ctx.saved_tensors
    if dz is None:  # z unused: nothing flows back
        return None, None, None, None, None, None
    dx, dw1, db1, dw2, db2 = mlp_backward_op(dz, x, w1, w2, h, a, ctx.kernel)
    b1_dtype, b2_dtype = ctx.bias_dtypes
    return dx, dw1, db1.to(b1_dtype), dw2, db2.to(b2_dtype), None


mlp_op = define("mlp", _mlp_impl, _mlp_fake, _mlp_grad, _mlp_setup, traffic=_mlp_traffic)


def op_dtype(x: torch.Tensor, w1: torch.Tensor) -> torch.dtype:
    """The dtype the op computes in: autocast's where it is on for x's device and the inputs
    are not fp64 (F.linear's rule), else the inputs' own (x's and w1's, promoted)."""
    dtype = torch.promote_types(x.dtype, w1.dtype)
    if dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return dtype


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
        kernel: bool = True) -> torch.Tensor:
    """fc2(gelu(fc1(x))) with the exact GELU, as the op ``cxrfast::mlp``.

    x: (..., d_in); w1: (hidden, d_in), b1: (hidden,); w2: (d_out, hidden), b2: (d_out,)
    (nn.Linear layouts). Returns z (..., d_out) in ``op_dtype``: under autocast the inputs are
    cast to the autocast dtype first (as F.linear casts them), so gradients come back to fp32
    parameters through those casts, in the parameters' dtypes. ``kernel=False`` runs the same
    op's torch reference (any device).
    """
    hidden, d_in = w1.shape
    if x.shape[-1] != d_in or b1.shape != (hidden,) or w2.shape[1:] != (hidden,) or b2.shape != w2.shape[:1]:
        raise ValueError(f"mlp shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, "
                         f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    dtype = op_dtype(x, w1)
    x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    return mlp_op(x, w1, b1, w2, b2, kernel)[0]


def mlp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
            upcast: bool = False) -> torch.Tensor:
    """Plain torch ``fc2(gelu(fc1(x)))`` (optionally computed in fp32, returned in x's dtype)."""
    dtype = x.dtype
    if upcast:
        x, w1, b1, w2, b2 = (t.float() for t in (x, w1, b1, w2, b2))
    F = torch.nn.functional
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).to(dtype)
