"""Masked-patch attention for the short sequences of MAE: non-causal softmax attention with
the whole key sequence in one tile (no online-softmax loop), forward and backward.

Modes (one kernel, addressing chosen per mode):
- dense: q, k, v (B, H, N, D);
- key padding: dense plus ``key_padding_mask`` (B, N), True = a real token to attend to;
- varlen: q, k, v (total_tokens, H, D) with ``cu_seqlens`` (B + 1,) int32 offsets, like
  flash-attn's varlen API (sequences of different lengths packed without padding).

Design limits: sequence length <= 512 (BLOCK_N = next power of two >= N holds every key);
head dims 16-256 (32, 64, 80, 128 are the tested ones; 80 is padded to 128 in registers);
fp32, bf16, fp16; the tiles of one program within the target GPU's shared memory per block
(``fits``: ``smem_bytes`` against kernels.launch.SMEM_PER_BLOCK, or torch's figure for the
device; without a GPU, the H100's).
Each program handles BLOCK_M queries of one (sequence, head) against all its keys; for sequences of 64 tokens or fewer, 2-4 (sequence, head) pairs share a program.
From 129 keys with D <= 64 the forward and dQ instead take 64-row tiles (wgmma on sm_90)
that loop over key blocks (online softmax in the forward; ``launch_configs`` says which).
Rows whose keys are all masked return 0. The backward, where ``launch_configs`` gives
'bwd_fused' (sm_90; up to 64 keys with D <= 64, 129-256 keys with D <= 32), is one pass per
(sequence, head): all its keys and values held while the program walks the query blocks, so
each operand is read once. Elsewhere it is FlashAttention-2's split form: a small kernel for
delta = rowsum(dO * O) (fp32), one for dQ (per query block), one for dK/dV (per key block,
looping over the query blocks), both recomputing P from the saved log-sum-exp.
The op ``cxrfast::attention_qkv`` runs the same kernels on the ViT's packed projection:
q, k, v, o, dO and dqkv are strided views, so no permute, select or zero-filled gradient.
"""
from __future__ import annotations

import math

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import DEFAULT_CAPABILITY, Config, capability, smem_per_block
from kernels.library import define, nbytes, no_autocast

MAX_SEQLEN = 512


def _pow2(x: int) -> int:
    return max(16, 1 << (max(x, 1) - 1).bit_length())


def launch_configs(max_n: int, d: int, dtype: torch.dtype,
                   cap: tuple[int, int] | None = None) -> dict[str, Config]:
    """Block sizes, warps and stages of the forward ('fwd') and the three backward kernels
    ('bwd_delta', 'bwd_dq', 'bwd_dkdv') for sequences of up to max_n tokens with head dim d, plus
    the one-pass backward ('bwd_fused') where compute capability ``cap`` (default: the H100/H200
    the project targets) runs it well; the backward launches it instead of the three. The one
    place they are chosen (the launches below and bench/gpu_static.py call it)."""
    if max_n > MAX_SEQLEN:
        raise ValueError(f"sequence length {max_n} exceeds the kernel's limit {MAX_SEQLEN}")
    if not 16 <= d <= 256:
        raise ValueError(f"head dim {d} outside the kernel's range 16-256")
    block_n = _pow2(max_n)
    block_d = _pow2(d)
    small = block_n * block_d <= 64 * 128
    # Forward and dQ hold a (BLOCK_M, BLOCK_N) score tile and the sequence's K and V. Checked
    # with bench/gpu_static.py: 32 query rows on 4 warps against 256 keys need over 255
    # registers (dQ spilled 256-280 bytes at N = 197, D = 32), 16 rows on 8 warps against 512
    # keys spill 8 bytes in the varlen forward; so 256 keys take 16 rows (32 from D = 64) on
    # 8 warps and 512 keys 16 rows on 16 warps.
    if block_n <= 128:
        block_m, warps = min(block_n, 64), 4 if small else 8
    elif block_n == 256:
        block_m, warps = 32 if block_d >= 64 else 16, 8
    else:
        block_m, warps = 16, 16
    pack = 4 if block_n <= 32 else 2 if block_n <= 64 else 1
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, KV_LOOP=False)
    fwd, dq = Config({**blocks, "PACK": pack}, warps, 3), Config(blocks, warps, 3)
    if block_n >= 256 and block_d <= 64:
        # 64-row tiles (one warpgroup: wgmma on sm_90) over key blocks of 64 (32 from D = 64):
        # sm_90 bf16 at N = 197/257, D = 32: fwd 95 and dQ 109 registers (31% / 25%), against
        # 64 / 70 on mma.sync with the 16-row single tile; 64 rows against all 256 keys needed
        # 174-255 registers (12%, dQ spilling 64 B). D = 64, N = 197: 95 / 94 (31%, was 25%).
        loop = dict(BLOCK_M=64, BLOCK_N=64 if block_d <= 32 else 32, BLOCK_D=block_d, KV_LOOP=True)
        fwd, dq = Config({**loop, "PACK": 1}, 4, 3), Config(loop, 4, 2)
    out = {"fwd": fwd,
           "bwd_delta": Config(dict(BLOCK_M=64, BLOCK_D=block_d), 4, 1),
           "bwd_dq": dq,
           "bwd_dkdv": Config(dict(BLOCK_M=16 if block_d > 64 else 32, BLOCK_N=min(block_n, 64), BLOCK_D=block_d),
                              4 if small else 8, 3)}
    fused = _fused_backward_config(block_n, block_d, cap or DEFAULT_CAPABILITY)
    if fused is not None:
        out["bwd_fused"] = fused
    return out


def _fused_backward_config(block_n: int, block_d: int, cap: tuple[int, int]) -> Config | None:
    """The one-pass backward's launch where bench/gpu_static.py shows it compiles without
    spills at >= 25% theoretical occupancy; None elsewhere (the three launches). It holds K, V
    and fp32 dK, dV for all the keys: 16 query rows a step, on many warps. sm_90 bf16: N = 50,
    D = 64: 128 registers, 25% (8 warps); N = 197, D = 32: 106 with the bias sums, 25% (16 warps); wgmma keeps the
    K/V operands in shared memory. On sm_80/86/89 (mma.sync holds them in registers) the same
    tiles need 255 registers and spill 40-2328 B, so those targets keep the three launches, as
    do N = 257 (512-key tiles spill 52 B), N = 197 with D = 64 (16 B of stack) and D = 80 (112 KiB
    of shared memory, over sm_86/89's 99 KiB)."""
    if cap[0] != 9:
        return None
    if block_n <= 64 and block_d <= 64:
        return Config(dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=block_d), 8, 2)
    if block_n == 256 and block_d <= 32:
        return Config(dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=block_d), 16, 1)
    return None


def uses_fused_backward(max_n: int, d: int, dtype: torch.dtype, cap: tuple[int, int] | None = None) -> bool:
    """Whether the backward at this shape on ``cap`` is the one-pass kernel (else the three launches)."""
    return max_n <= MAX_SEQLEN and 16 <= d <= 256 and "bwd_fused" in launch_configs(max_n, d, dtype, cap)


def smem_bytes(max_n: int, d: int, dtype: torch.dtype) -> int:
    """Upper bound on the shared memory of the backward and forward launches: the K and V
    tiles, a query-side tile pair (Q, dO; one per pipeline stage in dK/dV), the scores and 1 KiB
    of barriers and scratch, for the largest of the configurations (the one-pass backward's
    counted as its own sum). ``fits`` compares it with the
    target's limit; tests/test_gpu_static.py checks it against what Triton's compiler reports."""
    need = 0
    for name, cfg in launch_configs(max_n, d, dtype).items():
        if name == "bwd_delta":  # two (BLOCK_M, D) tiles, elementwise: registers, no shared memory to speak of
            continue
        bm, bn, bd = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_D"]
        if name == "bwd_fused":  # K/V staged for their three MMA uses; Q, dO, O per stage; P^T, dS^T
            need = max(need, (3 * bn * bd + 3 * cfg.num_stages * bm * bd + 2 * bm * bn) * dtype.itemsize + 1024)
            continue
        query_tiles = 2 * (cfg.num_stages if name == "bwd_dkdv" else 1)  # dK/dV pipelines its loop over Q, dO
        key_tiles = 2 * (cfg.num_stages if cfg.blocks.get("KV_LOOP") else 1)  # the key loop pipelines K, V
        need = max(need, (key_tiles * bn * bd + query_tiles * bm * bd + bm * bn) * dtype.itemsize + 1024)
    return need


def fits(n: int, d: int, dtype: torch.dtype, cap: tuple[int, int] | None = None,
         device: torch.device | str | None = None) -> bool:
    """Whether sequences of up to n tokens with head dim d fit the kernel's single tile on
    compute capability ``cap`` (or ``device``; see kernels.launch.smem_per_block)."""
    return n <= MAX_SEQLEN and 16 <= d <= 256 and smem_bytes(n, d, dtype) <= smem_per_block(cap, device)


@triton.jit
def _seq(CU, b, N, VARLEN: tl.constexpr):
    if VARLEN:
        start = tl.load(CU + b)
        n = tl.load(CU + b + 1) - start
    else:
        start = 0
        n = N
    return start, n


@triton.jit
def _key_valid(KPM, b, offs_n, n, stride_kpm, HAS_KPM: tl.constexpr):
    valid = offs_n < n
    if HAS_KPM:
        valid = valid & (tl.load(KPM + b * stride_kpm + offs_n, mask=offs_n < n, other=0) != 0)
    return valid


@triton.jit
def _tile(PTR, b, h, start, offs, offs_d, s_b, s_h, s_n, mask):
    """A (rows, head dim) tile of one sequence and head; masked lanes read 0."""
    return tl.load(PTR + b * s_b + h * s_h + (start + offs)[:, None] * s_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KPM, CU,  # Q/K/V/O: (B, H, N, D) or (T, H, D); LSE: fp32 (B*H*N or H*T)
              sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, stride_kpm,
              H, N, D, T, BH, scale,
              VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PACK: tl.constexpr, PREC: tl.constexpr,
              KV_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Short sequences share a program: PACK consecutive (sequence, head) pairs, one after another.
    # KV_LOOP: BLOCK_N keys at a time with an online softmax (64-row tiles for wgmma without the
    # registers of a 64 x 256 score tile); else every key in one BLOCK_N tile.
    for g in tl.static_range(PACK):
        bh = tl.program_id(1) * PACK + g
        if bh < BH:
            if KV_LOOP:
                _attn_fwd_loop(Q, K, V, O, LSE, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                               so_b, so_h, so_n, stride_kpm, H, N, D, T, scale, bh // H, bh % H, tl.program_id(0),
                               VARLEN, HAS_KPM, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
            else:
                _attn_fwd_one(Q, K, V, O, LSE, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                              so_b, so_h, so_n, stride_kpm, H, N, D, T, scale, bh // H, bh % H, tl.program_id(0),
                              VARLEN, HAS_KPM, PREC, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _attn_fwd_loop(Q, K, V, O, LSE, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                   so_b, so_h, so_n, stride_kpm, H, N, D, T, scale, b, h, pid_m,
                   VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The forward over key blocks with an online softmax; rows with no key give o = 0, lse = 0."""
    start, n = _seq(CU, b, N, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qmask = (offs_m < n)[:, None] & dmask[None, :]
    q = _tile(Q, b, h, start, offs_m, offs_d, sq_b, sq_h, sq_n, qmask)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = (offs_n < n)[:, None] & dmask[None, :]
        k = _tile(K, b, h, start, offs_n, offs_d, sk_b, sk_h, sk_n, kmask)
        v = _tile(V, b, h, start, offs_n, offs_d, sv_b, sv_h, sv_n, kmask)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(_key_valid(KPM, b, offs_n, n, stride_kpm, HAS_KPM)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + b * so_b + h * so_h + (start + offs_m)[:, None] * so_n + offs_d[None, :],
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=qmask)
    lse_base = tl.where(VARLEN, h * T + start, (b * H + h) * N)
    tl.store(LSE + lse_base + offs_m, m_i + tl.log(l_i), mask=offs_m < n)


@triton.jit
def _scores(Q, K, V, KPM, CU, b, h, pid_m, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, stride_kpm,
            H, N, D, T, scale, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query block of (b, h) against all its keys: the scaled scores, which keys count,
    the values, and what the caller needs to address its outputs."""
    start, n = _seq(CU, b, N, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qmask = (offs_m < n)[:, None] & dmask[None, :]
    kmask = (offs_n < n)[:, None] & dmask[None, :]
    q = _tile(Q, b, h, start, offs_m, offs_d, sq_b, sq_h, sq_n, qmask)
    k = _tile(K, b, h, start, offs_n, offs_d, sk_b, sk_h, sk_n, kmask)
    v = _tile(V, b, h, start, offs_n, offs_d, sv_b, sv_h, sv_n, kmask)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    valid = _key_valid(KPM, b, offs_n, n, stride_kpm, HAS_KPM)
    lse_base = tl.where(VARLEN, h * T + start, (b * H + h) * N)
    return s, valid, k, v, start, n, offs_m, offs_d, qmask, lse_base


@triton.jit
def _attn_fwd_one(Q, K, V, O, LSE, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                  so_b, so_h, so_n, stride_kpm, H, N, D, T, scale, b, h, pid_m,
                  VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    s, valid, k, v, start, n, offs_m, offs_d, qmask, lse_base = _scores(
        Q, K, V, KPM, CU, b, h, pid_m, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, stride_kpm,
        H, N, D, T, scale, VARLEN, HAS_KPM, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
    s = tl.where(valid[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, axis=1)
    l = tl.where(l == 0.0, 1.0, l)
    o = tl.dot(p.to(v.dtype), v, input_precision=PREC) / l[:, None]
    tl.store(O + b * so_b + h * so_h + (start + offs_m)[:, None] * so_n + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=qmask)
    tl.store(LSE + lse_base + offs_m, m + tl.log(l), mask=offs_m < n)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, CU,  # O/DO: (B, H, N, D) or (T, H, D) views; DELTA: fp32 like LSE
                    so_b, so_h, so_n, sd_b, sd_h, sd_n, H, N, D, T,
                    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 for BLOCK_M query rows of one (sequence, head). Its own
    small launch: computed inside the dQ kernel it raised that kernel's registers 63 -> 128
    (+88 B spill) at N = 257, D = 32 and 70 -> 98-106 at N = 197, D = 32 (bench/gpu_static.py)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    start, n = _seq(CU, b, N, VARLEN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n)[:, None] & (offs_d < D)[None, :]
    o = _tile(O, b, h, start, offs_m, offs_d, so_b, so_h, so_n, mask).to(tl.float32)
    do = _tile(DO, b, h, start, offs_m, offs_d, sd_b, sd_h, sd_n, mask).to(tl.float32)
    lse_base = tl.where(VARLEN, h * T + start, (b * H + h) * N)
    tl.store(DELTA + lse_base + offs_m, tl.sum(o * do, axis=1), mask=offs_m < n)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KPM, CU,  # LSE, DELTA: fp32 (B*H*N or H*T)
                 sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, stride_kpm,
                 sdq_b, sdq_h, sdq_n,
                 H, N, D, T, scale,
                 VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr, KV_LOOP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    if KV_LOOP:
        _attn_bwd_dq_loop(Q, K, V, DO, DQ, LSE, DELTA, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
                          sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, stride_kpm, sdq_b, sdq_h, sdq_n, H, N, D, T, scale,
                          VARLEN, HAS_KPM, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _attn_bwd_dq_one(Q, K, V, DO, DQ, LSE, DELTA, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
                         sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, stride_kpm, sdq_b, sdq_h, sdq_n, H, N, D, T, scale,
                         VARLEN, HAS_KPM, PREC, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _attn_bwd_dq_loop(Q, K, V, DO, DQ, LSE, DELTA, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
                      sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, stride_kpm, sdq_b, sdq_h, sdq_n, H, N, D, T, scale,
                      VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ over key blocks (P from the saved lse, so no online rescaling)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    start, n = _seq(CU, b, N, VARLEN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qmask = (offs_m < n)[:, None] & dmask[None, :]
    q = _tile(Q, b, h, start, offs_m, offs_d, sq_b, sq_h, sq_n, qmask)
    do = _tile(DO, b, h, start, offs_m, offs_d, sd_b, sd_h, sd_n, qmask)
    lse_base = tl.where(VARLEN, h * T + start, (b * H + h) * N)
    lse = tl.load(LSE + lse_base + offs_m, mask=offs_m < n, other=0.0)
    delta = tl.load(DELTA + lse_base + offs_m, mask=offs_m < n, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = (offs_n < n)[:, None] & dmask[None, :]
        k = _tile(K, b, h, start, offs_n, offs_d, sk_b, sk_h, sk_n, kmask)
        v = _tile(V, b, h, start, offs_n, offs_d, sv_b, sv_h, sv_n, kmask)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        valid = _key_valid(KPM, b, offs_n, n, stride_kpm, HAS_KPM)
        p = tl.where(valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b * sdq_b + h * sdq_h + (start + offs_m)[:, None] * sdq_n + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _attn_bwd_dq_one(Q, K, V, DO, DQ, LSE, DELTA, KPM, CU, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
                     sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, stride_kpm, sdq_b, sdq_h, sdq_n, H, N, D, T, scale,
                     VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    s, valid, k, v, start, n, offs_m, offs_d, qmask, lse_base = _scores(
        Q, K, V, KPM, CU, b, h, tl.program_id(0), sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, stride_kpm,
        H, N, D, T, scale, VARLEN, HAS_KPM, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
    do = _tile(DO, b, h, start, offs_m, offs_d, sd_b, sd_h, sd_n, qmask)
    lse = tl.load(LSE + lse_base + offs_m, mask=offs_m < n, other=0.0)
    delta = tl.load(DELTA + lse_base + offs_m, mask=offs_m < n, other=0.0)
    p = tl.where(valid[None, :], tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + (start + offs_m)[:, None] * sdq_n + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _key_block(K, V, KPM, b, h, start, n, offs_n, offs_d, dmask, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, stride_kpm,
               H, N, T, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr):
    """The key side a backward program keeps: its K and V tiles, which keys count, their
    tile mask, and where the sequence's lse/delta rows start."""
    kmask = (offs_n < n)[:, None] & dmask[None, :]
    k = _tile(K, b, h, start, offs_n, offs_d, sk_b, sk_h, sk_n, kmask)
    v = _tile(V, b, h, start, offs_n, offs_d, sv_b, sv_h, sv_n, kmask)
    valid = _key_valid(KPM, b, offs_n, n, stride_kpm, HAS_KPM)
    lse_base = tl.where(VARLEN, h * T + start, (b * H + h) * N)
    return k, v, valid, kmask, lse_base


@triton.jit
def _store_kv_grads(DK, DV, dk, dv, b, h, start, offs_n, offs_d, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, kmask):
    tl.store(DK + b * sdk_b + h * sdk_h + (start + offs_n)[:, None] * sdk_n + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * sdv_b + h * sdv_h + (start + offs_n)[:, None] * sdv_n + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU,
                   sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, stride_kpm,
                   sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                   H, N, D, T, scale,
                   VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start, n = _seq(CU, b, N, VARLEN)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k, v, valid, kmask, lse_base = _key_block(K, V, KPM, b, h, start, n, offs_n, offs_d, dmask, sk_b, sk_h, sk_n,
                                              sv_b, sv_h, sv_n, stride_kpm, H, N, T, VARLEN, HAS_KPM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, n, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qmask = (offs_m < n)[:, None] & dmask[None, :]
        q = _tile(Q, b, h, start, offs_m, offs_d, sq_b, sq_h, sq_n, qmask)
        do = _tile(DO, b, h, start, offs_m, offs_d, sd_b, sd_h, sd_n, qmask)
        lse = tl.load(LSE + lse_base + offs_m, mask=offs_m < n, other=0.0)
        delta = tl.load(DELTA + lse_base + offs_m, mask=offs_m < n, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        p = tl.where(valid[None, :] & (offs_m < n)[:, None], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    _store_kv_grads(DK, DV, dk * scale, dv, b, h, start, offs_n, offs_d, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                    kmask)


@triton.jit
def _attn_bwd_fused(Q, K, V, O, DO, DQ, DK, DV, LSE, KPM, CU, DB,  # LSE: fp32 (B*H*N or H*T)
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sd_b, sd_h, sd_n,
                    stride_kpm, sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                    H, N, D, T, scale,
                    VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr, HAS_DB: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole backward of one (sequence, head) in one pass: its keys and values stay in
    registers while the program walks the query blocks, so q, k, v, O, dO and lse are read once
    and dq, dk, dv written once (delta = rowsum(dO * O) inline, fp32; no delta buffer).
    HAS_DB: also the sequence's share of the qkv bias gradient, the fp32 token sums of dq, dk,
    dv, into DB (B, 3, H, D) - so no reduction pass reads dqkv again."""
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    start, n = _seq(CU, b, N, VARLEN)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k, v, valid, kmask, lse_base = _key_block(K, V, KPM, b, h, start, n, offs_n, offs_d, dmask, sk_b, sk_h, sk_n,
                                              sv_b, sv_h, sv_n, stride_kpm, H, N, T, VARLEN, HAS_KPM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dq_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_m in range(0, n, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qmask = (offs_m < n)[:, None] & dmask[None, :]
        q = _tile(Q, b, h, start, offs_m, offs_d, sq_b, sq_h, sq_n, qmask)
        do = _tile(DO, b, h, start, offs_m, offs_d, sd_b, sd_h, sd_n, qmask)
        o = _tile(O, b, h, start, offs_m, offs_d, so_b, so_h, so_n, qmask)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        lse = tl.load(LSE + lse_base + offs_m, mask=offs_m < n, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        p = tl.where(valid[None, :] & (offs_m < n)[:, None], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq = tl.dot(ds, k, input_precision=PREC) * scale
        tl.store(DQ + b * sdq_b + h * sdq_h + (start + offs_m)[:, None] * sdq_n + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qmask)
        if HAS_DB:
            dq_sum += tl.sum(tl.where(qmask, dq, 0.0), axis=0)
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    dk = dk * scale
    _store_kv_grads(DK, DV, dk, dv, b, h, start, offs_n, offs_d, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, kmask)
    if HAS_DB:
        row = DB + (b * 3 * H + h) * D + offs_d  # DB[b, 0, h, :]; k and v thirds H * D further on
        tl.store(row, dq_sum, mask=dmask)
        tl.store(row + H * D, tl.sum(tl.where(kmask, dk, 0.0), axis=0), mask=dmask)
        tl.store(row + 2 * H * D, tl.sum(tl.where(kmask, dv, 0.0), axis=0), mask=dmask)


def _precision(t: torch.Tensor):
    """fp32 inputs multiply in full fp32 ("ieee", not TF32) so fp32 stays an exact reference
    mode on GPUs too; half inputs use the tensor cores as they are."""
    return "ieee" if t.dtype == torch.float32 else None


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides; varlen tensors (T, H, D) have no batch stride."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _check_fits(n: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
    if not fits(n, d, dtype, device=device):
        raise ValueError(f"sequence length {n} with head dim {d} in {dtype} needs "
                         f"{smem_bytes(n, d, dtype) // 1024} KiB of shared memory, over the "
                         f"{smem_per_block(device=device) // 1024} KiB of this GPU; "
                         "use scaled_dot_product_attention (cxrfast.ops does)")


def _unit_last(*ts):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _dims(q, cu_seqlens, max_seqlen):
    """(batch, heads, max tokens, head dim, total tokens) of dense (B, H, N, D) or varlen (T, H, D) q."""
    if cu_seqlens is not None:
        t_total, h, d = q.shape
        return cu_seqlens.numel() - 1, h, max_seqlen, d, t_total
    batch, h, n, d = q.shape
    return batch, h, n, d, batch * n


def _launch_forward(q, k, v, o, lse, cu_seqlens, max_seqlen, key_padding_mask, scale) -> None:
    """Runs the forward kernel into o (any strides with a unit last one) and lse."""
    varlen = cu_seqlens is not None
    batch, h, n, d, t_total = _dims(q, cu_seqlens, max_seqlen)
    _check_fits(n, d, q.dtype, q.device)
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else q
    cu = cu_seqlens if varlen else q
    cfg = launch_configs(n, d, q.dtype)["fwd"]
    grid = (triton.cdiv(n, cfg.blocks["BLOCK_M"]), triton.cdiv(batch * h, cfg.blocks["PACK"]))
    _attn_fwd[grid](q, k, v, o, lse, kpm, cu, *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                    *_strides(o, varlen), kpm.stride(0) if key_padding_mask is not None else 0,
                    h, n, d, t_total, batch * h, scale, VARLEN=varlen, HAS_KPM=key_padding_mask is not None,
                    PREC=_precision(q), **cfg.kwargs())


def _launch_backward(do, q, k, v, o, lse, dq, dk, dv, cu, max_seqlen, key_padding_mask, scale, db=None) -> bool:
    """Runs the one-pass backward where ``launch_configs`` gives 'bwd_fused' for this GPU, else
    the delta kernel (rowsum(dO * O), fp32, laid out like lse), then the dQ and the dK/dV
    kernels that read it (same stream, in order); dq, dk, dv may be strided views of one buffer.
    ``db`` (B, 3, H, D) fp32, dense only: the one-pass kernel writes each sequence's token sums
    of dq, dk, dv there. Returns whether it did (False: the three launches, db untouched)."""
    varlen, has_kpm = cu is not None, key_padding_mask is not None
    batch, h, n, d, t_total = _dims(q, cu, max_seqlen)
    kpm = key_padding_mask.to(torch.int8).contiguous() if has_kpm else q
    cu_arg = cu if varlen else q
    cfg = launch_configs(n, d, q.dtype, capability(q.device))
    common = dict(VARLEN=varlen, HAS_KPM=has_kpm, PREC=_precision(q))
    strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
               kpm.stride(0) if has_kpm else 0)
    # fp32 on a GPU (the exact "ieee" mode) keeps the three launches: its one-pass tiles spill
    # 0.9-1.9 KB on sm_90 (bench/gpu_static.py); under the interpreter (CPU) fp32 runs it.
    if "bwd_fused" in cfg and not (q.is_cuda and q.dtype == torch.float32):
        _attn_bwd_fused[(batch * h,)](
            q, k, v, o, do, dq, dk, dv, lse, kpm, cu_arg, db if db is not None else lse, *strides[:9],
            *_strides(o, varlen), *strides[9:], *_strides(dq, varlen), *_strides(dk, varlen), *_strides(dv, varlen),
            h, n, d, t_total, scale, **common, HAS_DB=db is not None, **cfg["bwd_fused"].kwargs())
        return db is not None
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    delta_cfg, dq_cfg, dkdv_cfg = cfg["bwd_delta"], cfg["bwd_dq"], cfg["bwd_dkdv"]
    _attn_bwd_delta[(triton.cdiv(n, delta_cfg.blocks["BLOCK_M"]), batch * h)](
        o, do, delta, cu_arg, *_strides(o, varlen), *_strides(do, varlen), h, n, d, t_total, VARLEN=varlen,
        **delta_cfg.kwargs())
    _attn_bwd_dq[(triton.cdiv(n, dq_cfg.blocks["BLOCK_M"]), batch * h)](
        q, k, v, do, dq, lse, delta, kpm, cu_arg, *strides, *_strides(dq, varlen), h, n, d, t_total, scale,
        **common, **dq_cfg.kwargs())
    _attn_bwd_dkdv[(triton.cdiv(n, dkdv_cfg.blocks["BLOCK_N"]), batch * h)](
        q, k, v, do, dk, dv, lse, delta, kpm, cu_arg, *strides, *_strides(dk, varlen), *_strides(dv, varlen),
        h, n, d, t_total, scale, **common, **dkdv_cfg.kwargs())
    return False


def _forward(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, scale):
    """The kernel's forward: (o like q, contiguous; lse fp32, (B, H, N) or (H, T))."""
    q, k, v = _unit_last(q, k, v)
    batch, h, n, _, t_total = _dims(q, cu_seqlens, max_seqlen)
    lse_shape = (h, t_total) if cu_seqlens is not None else (batch, h, n)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_forward(q, k, v, o, lse, cu_seqlens, max_seqlen, key_padding_mask, scale)
    return o, lse


def _backward(do, q, k, v, o, lse, cu, max_seqlen, key_padding_mask, scale):
    """The kernel's backward: (dq, dk, dv), contiguous, in q's dtype."""
    q, k, v, do, o = _unit_last(q, k, v, do, o)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _launch_backward(do, q, k, v, o, lse, dq, dk, dv, cu, max_seqlen, key_padding_mask, scale)
    return dq, dk, dv


def _sequences(cu_seqlens, key_padding_mask, q):
    """(slices into the token dim, key mask or None) per block the references compute at once:
    the whole batch when dense, each sequence (as a batch of one) when varlen."""
    if cu_seqlens is None:
        return [(slice(None), key_padding_mask)]
    bounds = cu_seqlens.tolist()  # host sync: the references only
    return [(slice(s, e), None) for s, e in zip(bounds[:-1], bounds[1:])]


def _dense(t, sl, varlen):
    """(B, H, N, D) view of one reference block."""
    return t[sl].transpose(0, 1)[None] if varlen else t


def _probs(q, k, kpm, scale, lse):
    """Scores (with -inf at masked keys) and, given lse, the softmax probabilities."""
    s = (q @ k.transpose(-2, -1)) * scale
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :].bool(), float("-inf"))
    return s if lse is None else torch.exp(s - lse[..., None])


def _forward_ref(q, k, v, cu_seqlens, key_padding_mask, scale):
    """The kernel's forward in plain torch, in at least fp32: explicit softmax, rows with every
    key masked give o = 0 and lse = 0 (as the kernel stores them)."""
    varlen = cu_seqlens is not None
    cdt = torch.promote_types(q.dtype, torch.float32)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]) if varlen else q.shape[:-1], dtype=cdt, device=q.device)
    with no_autocast(q.device):
        for sl, kpm in _sequences(cu_seqlens, key_padding_mask, q):
            qi, ki, vi = (_dense(t, sl, varlen).to(cdt) for t in (q, k, v))
            s = _probs(qi, ki, kpm, scale, None)
            m = torch.logsumexp(s, -1)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            oi = torch.exp(s - m[..., None]) @ vi
            if varlen:
                o[sl] = oi[0].transpose(0, 1).to(q.dtype)
                lse[:, sl] = m[0]
            else:
                o.copy_(oi)
                lse.copy_(m)
    return o, lse


def _backward_ref(do, q, k, v, o, lse, cu_seqlens, key_padding_mask, scale):
    """The kernel's backward in plain torch (FlashAttention-2's formulas, P from lse)."""
    varlen = cu_seqlens is not None
    cdt = lse.dtype
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
    with no_autocast(q.device):
        for sl, kpm in _sequences(cu_seqlens, key_padding_mask, q):
            qi, ki, vi, oi, doi = (_dense(t, sl, varlen).to(cdt) for t in (q, k, v, o, do))
            li = lse[:, sl][None] if varlen else lse
            p = _probs(qi, ki, kpm, scale, li)
            delta = (doi * oi).sum(-1, keepdim=True)
            ds = p * (doi @ vi.transpose(-2, -1) - delta)
            for g, gi in zip(grads, (ds @ ki * scale, ds.transpose(-2, -1) @ qi * scale, p.transpose(-2, -1) @ doi)):
                if varlen:
                    g[sl] = gi[0].transpose(0, 1).to(g.dtype)
                else:
                    g.copy_(gi)
    return tuple(grads)


def _attn_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
               max_seqlen: int, key_padding_mask: Optional[torch.Tensor], scale: float,
               kernel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of softmax attention."""
    if kernel:
        return _forward(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, scale)
    return _forward_ref(q, k, v, cu_seqlens, key_padding_mask, scale)


def _attn_bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                   key_padding_mask: Optional[torch.Tensor], scale: float,
                   kernel: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of softmax attention."""
    if kernel:
        return _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, key_padding_mask, scale)
    return _backward_ref(do, q, k, v, o, lse, cu_seqlens, key_padding_mask, scale)


def _attn_fake(q, k, v, cu_seqlens, max_seqlen, key_padding_mask, scale, kernel):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else q.shape[:-1]
    lse_dtype = torch.float32 if kernel else torch.promote_types(q.dtype, torch.float32)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=lse_dtype)


def _attn_bwd_fake(do, q, k, v, o, lse, cu_seqlens, max_seqlen, key_padding_mask, scale, kernel):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_bwd_traffic(args, out):
    do, q, k, v, o, lse, _cu, max_seqlen = args[:8]
    n = q.shape[2] if q.ndim == 4 else max_seqlen
    return _bwd_traffic(do, nbytes(q, k, v), o, lse, nbytes(*out), n, q.shape[-1])


attention_backward_op = define("attention_backward", _attn_bwd_impl, _attn_bwd_fake, traffic=_attn_bwd_traffic)


def _attn_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, key_padding_mask, scale, kernel = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse: the backward ignores it
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, key_padding_mask)
    ctx.args = (max_seqlen, scale, kernel)


def _attn_grad(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens, key_padding_mask = ctx.saved_tensors
    max_seqlen, scale, kernel = ctx.args
    dq, dk, dv = attention_backward_op(do, q, k, v, o, lse, cu_seqlens, max_seqlen, key_padding_mask, scale,
                                       kernel)
    return dq, dk, dv, None, None, None, None, None


attention_op = define("attention", _attn_impl, _attn_fake, _attn_grad, _attn_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None, key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None, kernel: bool = True) -> torch.Tensor:
    """Softmax attention over short sequences (N <= 512), forward and backward, as the op
    ``cxrfast::attention``.

    Dense: q, k, v (B, H, N, D) -> (B, H, N, D); ``key_padding_mask`` (B, N) bool, True =
    attend. Varlen: q, k, v (total, H, D) with ``cu_seqlens`` (B + 1,) int32 and
    ``max_seqlen`` (a Python int; computed with a device sync when omitted). ``scale``
    defaults to 1/sqrt(D). The output is contiguous. ``kernel=False`` runs the same op's
    torch reference (any device, any length).
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if cu_seqlens is not None:
        if q.ndim != 3 or key_padding_mask is not None:
            raise ValueError("varlen mode takes (total, H, D) tensors and no key_padding_mask")
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host-device sync
    elif q.ndim != 4:
        raise ValueError("dense mode takes (B, H, N, D) tensors")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k and v must have the same shape")
    if key_padding_mask is not None and key_padding_mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, N) = {(q.shape[0], q.shape[2])}")
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()
    o, _ = attention_op(q, k, v, cu_seqlens, int(max_seqlen or 0), key_padding_mask, scale, kernel)
    return o


# ---- attention on the packed qkv projection (the ViT's layout) ----------------------------
# qkv (B, N, 3*H*D) straight from the qkv Linear; o (B, N, H*D) straight into proj. q, k, v,
# o, dO and the three thirds of dqkv are strided (B, H, N, D) views the kernels address
# through their strides: no select/permute copies, no zeros + adds in the backward graph.

def _qkv_views(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, H, N, D) views of qkv (B, N, 3*H*D) (any strides, a unit last one)."""
    parts = qkv.unflatten(-1, (3, num_heads, qkv.shape[-1] // (3 * num_heads)))
    return tuple(parts[:, :, i].transpose(1, 2) for i in range(3))


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, H, N, D) view of t (B, N, H*D)."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)


def _attn_qkv_impl(qkv: torch.Tensor, num_heads: int, scale: float, kernel: bool,
                   bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o (B, N, H*D) contiguous, lse (B, H, N)) of softmax attention on packed qkv. ``bias``
    is not applied: it is the bias already inside qkv, an input only so that the backward
    returns its gradient (see :func:`attention_qkv`)."""
    (qkv,) = _unit_last(qkv)
    b, n, three_hd = qkv.shape
    q, k, v = _qkv_views(qkv, num_heads)
    o = torch.empty(b, n, three_hd // 3, dtype=qkv.dtype, device=qkv.device)
    if kernel:
        lse = torch.empty(b, num_heads, n, dtype=torch.float32, device=qkv.device)
        _launch_forward(q, k, v, _heads(o, num_heads), lse, None, n, None, scale)
        return o, lse
    oh, lse = _forward_ref(q, k, v, None, None, scale)
    _heads(o, num_heads).copy_(oh)
    return o, lse


def _attn_qkv_bwd_impl(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                       scale: float, kernel: bool, with_bias: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dqkv (B, N, 3*H*D) contiguous in qkv's dtype, dbias): do and o are (B, N, H*D); dbias is
    the token sum of dqkv (fp32, fp64 for fp64 inputs), (3*H*D,), under ``with_bias`` (else empty): from the one-pass
    kernel's per-sequence sums where it runs, else a reduction over dqkv."""
    qkv, do, o = _unit_last(qkv, do, o)
    q, k, v = _qkv_views(qkv, num_heads)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = _qkv_views(dqkv, num_heads)
    doh, oh = _heads(do, num_heads), _heads(o, num_heads)
    summed = False
    if kernel:
        b, n, three_hd = qkv.shape
        sums = torch.empty(b, 3, num_heads, three_hd // (3 * num_heads), dtype=torch.float32,
                           device=qkv.device) if with_bias else None
        summed = _launch_backward(doh, q, k, v, oh, lse, dq, dk, dv, None, q.shape[2], None, scale, sums)
    else:
        for g, r in zip((dq, dk, dv), _backward_ref(doh, q, k, v, oh, lse, None, None, scale)):
            g.copy_(r)
    acc = torch.promote_types(qkv.dtype, torch.float32)  # fp32 sums for 16-bit and fp32, fp64 for fp64
    if not with_bias:
        return dqkv, dqkv.new_empty(0, dtype=acc)
    if summed:
        return dqkv, sums.sum(0).flatten().to(acc)
    return dqkv, dqkv.flatten(0, 1).sum(0, dtype=acc)


def _attn_qkv_fake(qkv, num_heads, scale, kernel, bias=None):
    b, n, three_hd = qkv.shape
    lse_dtype = torch.float32 if kernel else torch.promote_types(qkv.dtype, torch.float32)
    return qkv.new_empty(b, n, three_hd // 3), qkv.new_empty(b, num_heads, n, dtype=lse_dtype)


def _attn_qkv_bwd_fake(do, qkv, o, lse, num_heads, scale, kernel, with_bias=False):
    acc = torch.promote_types(qkv.dtype, torch.float32)
    return qkv.new_empty(qkv.shape), qkv.new_empty(qkv.shape[-1] if with_bias else 0, dtype=acc)


def _bwd_traffic(do, qkv_bytes, o, lse, grads_bytes, n, d):
    """What the chosen backward launches move, each reading its operands once. One pass
    (``bwd_fused``): q, k, v, O, dO, lse -> dq, dk, dv. Three launches: delta (O, dO -> delta,
    fp32 like lse), dQ and dK/dV (each q, k, v, dO, lse, delta -> their gradients)."""
    if uses_fused_backward(n, d, do.dtype):
        return qkv_bytes + nbytes(o, do, lse), grads_bytes
    delta = lse.numel() * 4
    read = nbytes(o, do) + 2 * (qkv_bytes + nbytes(do, lse) + delta)
    return read, delta + grads_bytes


def _attn_qkv_bwd_traffic(args, out):
    """The launches' traffic (above) plus the bias gradient's: the one-pass kernel's per-sequence
    sums written and read back by their small reduction, else a reduction reading dqkv."""
    do, qkv, o, lse, num_heads = args[:5]
    with_bias = len(args) > 7 and args[7]
    n, d = qkv.shape[1], qkv.shape[-1] // (3 * num_heads)
    read, written = _bwd_traffic(do, nbytes(qkv), o, lse, nbytes(*out), n, d)
    if with_bias:
        sums = qkv.shape[0] * qkv.shape[-1] * 4
        read += sums if uses_fused_backward(n, d, do.dtype) else nbytes(out[0])
        written += sums if uses_fused_backward(n, d, do.dtype) else 0
    return read, written


attention_qkv_backward_op = define("attention_qkv_backward", _attn_qkv_bwd_impl, _attn_qkv_bwd_fake,
                                   traffic=_attn_qkv_bwd_traffic)


def _attn_qkv_setup(ctx, inputs, output):
    qkv, num_heads, scale, kernel = inputs[:4]
    bias = inputs[4] if len(inputs) > 4 else None
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse: the backward ignores it
    ctx.save_for_backward(qkv, o, lse)
    ctx.args = (num_heads, scale, kernel)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _attn_qkv_grad(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    with_bias = ctx.bias_dtype is not None
    dqkv, dbias = attention_qkv_backward_op(do, qkv, o, lse, *ctx.args, with_bias)
    return dqkv, None, None, None, dbias.to(ctx.bias_dtype) if with_bias else None


attention_qkv_op = define("attention_qkv", _attn_qkv_impl, _attn_qkv_fake, _attn_qkv_grad, _attn_qkv_setup)


def attention_qkv(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None,
                  kernel: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention on the packed projection, as the op ``cxrfast::attention_qkv``.

    qkv: (B, N, 3*H*D), the qkv Linear's output (q, k, v thirds, heads inside each; any
    strides with a unit last one); returns o (B, N, H*D), contiguous, the layout the output
    projection reads. Its backward takes dO (B, N, H*D) and returns one (B, N, 3*H*D)
    gradient. Same limits as :func:`attention`; ``kernel=False`` runs the torch reference.

    ``bias``: the Linear's bias when qkv was computed with that bias *detached*
    (:func:`qkv_attention` does it): it is not added again, but its gradient, the token sum of
    dqkv, comes back through this op - from the one-pass backward kernel's own sums, so no
    reduction pass reads the whole dqkv a second time.
    """
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be (B, N, 3*H*D) with H = {num_heads}, got {tuple(qkv.shape)}")
    if bias is not None and bias.shape != (qkv.shape[-1],):
        raise ValueError(f"bias must be ({qkv.shape[-1]},) like qkv's last dim, got {tuple(bias.shape)}")
    d = qkv.shape[-1] // (3 * num_heads)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o, _ = attention_qkv_op(qkv, int(num_heads), scale, kernel, bias)
    return o


def qkv_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, *,
                  scale: float | None = None, kernel: bool = True) -> torch.Tensor:
    """The qkv projection and attention: ``attention_qkv(F.linear(x, weight, bias), ...)`` with
    the bias added in the projection's GEMM but differentiated through the attention op (see
    :func:`attention_qkv`): same values and gradients, one reduction over dqkv fewer."""
    qkv = F.linear(x, weight, None if bias is None else bias.detach())
    return attention_qkv(qkv, num_heads, scale=scale, kernel=kernel, bias=bias)


def attention_qkv_ref(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None) -> torch.Tensor:
    """Plain torch reference of :func:`attention_qkv` (through :func:`attention_ref`)."""
    q, k, v = _qkv_views(qkv, num_heads)
    o = attention_ref(q, k, v, scale=scale)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)


def attention_ref(q, k, v, *, cu_seqlens=None, key_padding_mask=None, scale=None, upcast=False):
    """Plain torch reference (explicit softmax; masked rows give 0), all three modes."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_seqlens is not None:
        out = []
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            qi, ki, vi = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            out.append(attention_ref(qi, ki, vi, scale=scale)[0].transpose(0, 1))
        return torch.cat(out).to(dtype)
    s = (q @ k.transpose(-2, -1)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with every key masked
    return (p @ v).to(dtype)
