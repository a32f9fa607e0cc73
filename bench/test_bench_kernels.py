"""Triton kernels against their anchors on the GPU, in one run (skipped without CUDA).

- LayerNorm (+ residual) fwd+bwd, GB/s from bytes moved, at the MAE shapes, against torch
  eager, torch.compile, and Liger / apex when installed; plus the card's copy bandwidth.
- Attention fwd+bwd, TFLOP/s (3.5 x 4 N^2 D per head), N = 50 and 197, D = 64, against
  scaled_dot_product_attention with each backend, and varlen against SDPA with a mask.
- MAE loss fwd+bwd against the eager patchify + normalise + MSE.
- A whole MAE ViT-B/16 training step with cxrfast.ops on the kernels versus on torch.

Run: pytest bench/test_bench_kernels.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need CUDA", allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from cxrfast import ops  # noqa: E402
from kernels.attention import attention  # noqa: E402
from kernels.layernorm import layer_norm, layer_norm_ref  # noqa: E402
from kernels.mae_loss import mae_loss, mae_loss_ref  # noqa: E402

BF16 = torch.bfloat16


def _timed(benchmark, fn, rounds=20):
    def run():
        fn()
        torch.cuda.synchronize()
    run()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=3)
    return benchmark.stats.stats.median if benchmark.stats else None


def test_copy_bandwidth(benchmark):
    benchmark.group = "device copy bandwidth (the roofline for memory-bound kernels)"
    benchmark.name = "cxrfast-reference: torch copy_ 1 GiB"
    src = torch.empty(2**29, dtype=BF16, device="cuda")
    dst = torch.empty_like(src)
    t = _timed(benchmark, lambda: dst.copy_(src))
    if t:
        benchmark.extra_info["GB/s"] = round(2 * src.numel() * 2 / t / 1e9)


LN_SHAPES = [(256 * 50, 768), (256 * 197, 512), (256 * 50, 1024)]


def _ln_impls():
    impls = {"cxrfast triton": lambda x, r, w, b: layer_norm(x, w, b, 1e-6, r),
             "torch eager": lambda x, r, w, b: layer_norm_ref(x, w, b, 1e-6, r),
             "torch.compile": torch.compile(lambda x, r, w, b: layer_norm_ref(x, w, b, 1e-6, r))}
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        impls["liger"] = lambda x, r, w, b: (LigerLayerNormFunction.apply(x + r, w, b, 1e-6), None)
    except ImportError:
        pass
    return impls


@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", list(_ln_impls()))
def test_layernorm_fwd_bwd(benchmark, shape, impl):
    m, n = shape
    benchmark.group = f"residual+LayerNorm fwd+bwd bf16 {m}x{n}"
    fn = _ln_impls()[impl]
    x, r = (torch.randn(m, n, device="cuda", dtype=BF16, requires_grad=True) for _ in range(2))
    w = torch.randn(n, device="cuda", dtype=BF16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=BF16, requires_grad=True)
    gy = torch.randn(m, n, device="cuda", dtype=BF16)

    def step():
        y, _ = fn(x, r, w, b)
        torch.autograd.grad(y, (x, r, w, b), gy)
    t = _timed(benchmark, step)
    if t:  # fwd: read x, r; write y, h. bwd: read h, dy; write dx (= dr). Bytes of bf16.
        benchmark.extra_info["GB/s"] = round(7 * m * n * 2 / t / 1e9)


ATTN = [(256, 12, 50, 64), (1024, 12, 50, 64), (256, 16, 197, 64), (256, 12, 197, 64)]
SDPA_BACKENDS = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa cudnn": SDPBackend.CUDNN_ATTENTION}


@pytest.mark.parametrize("shape", ATTN, ids=lambda s: "B{}-H{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("impl", ["cxrfast triton", *SDPA_BACKENDS])
def test_attention_fwd_bwd(benchmark, shape, impl):
    b, h, n, d = shape
    benchmark.group = f"attention fwd+bwd bf16 B={b} H={h} N={n} D={d}"
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=BF16, requires_grad=True) for _ in range(3))
    go = torch.randn(b, h, n, d, device="cuda", dtype=BF16)
    if impl == "cxrfast triton":
        fwd = lambda: attention(q, k, v)  # noqa: E731
    else:
        backend = SDPA_BACKENDS[impl]

        def fwd():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        try:
            fwd()
        except RuntimeError as exc:
            pytest.skip(f"{impl} unavailable: {exc}")
    t = _timed(benchmark, lambda: torch.autograd.grad(fwd(), (q, k, v), go))
    if t:
        benchmark.extra_info["TFLOP/s"] = round(3.5 * 4 * b * h * n * n * d / t / 1e12, 1)


@pytest.mark.parametrize("impl", ["cxrfast triton varlen", "sdpa efficient + mask (padded)"])
def test_attention_varlen(benchmark, impl):
    b, h, n, d = 512, 12, 50, 64
    benchmark.group = f"varlen attention fwd+bwd bf16, {b} sequences of 25-50 tokens, H={h} D={d}"
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(25, n + 1, (b,), generator=g)
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    total = int(cu[-1])
    if impl.startswith("cxrfast"):
        q, k, v = (torch.randn(total, h, d, device="cuda", dtype=BF16, requires_grad=True) for _ in range(3))
        cu_d = cu.cuda()
        fwd = lambda: attention(q, k, v, cu_seqlens=cu_d, max_seqlen=n)  # noqa: E731
        go = torch.randn(total, h, d, device="cuda", dtype=BF16)
    else:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=BF16, requires_grad=True) for _ in range(3))
        keep = (torch.arange(n)[None, :] < lens[:, None]).cuda()
        mask = keep[:, None, None, :].expand(b, h, n, n)

        def fwd():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        go = torch.randn(b, h, n, d, device="cuda", dtype=BF16)
    t = _timed(benchmark, lambda: torch.autograd.grad(fwd(), (q, k, v), go))
    if t:
        useful = 3.5 * 4 * h * d * float((lens.double() ** 2).sum())
        benchmark.extra_info["useful TFLOP/s"] = round(useful / t / 1e12, 1)


@pytest.mark.parametrize("impl", ["cxrfast triton", "torch eager", "torch.compile"])
def test_mae_loss(benchmark, impl):
    benchmark.group = "MAE loss fwd+bwd, B=256, 224x224, p=16, norm_pix, mask 0.75"
    b = 256
    imgs = torch.randn(b, 1, 224, 224, device="cuda")
    pred = torch.randn(b, 196, 256, device="cuda", dtype=BF16, requires_grad=True)
    mask = (torch.rand(b, 196, device="cuda") < 0.75).float()
    fn = {"cxrfast triton": mae_loss, "torch eager": mae_loss_ref, "torch.compile": torch.compile(mae_loss_ref)}[impl]
    _timed(benchmark, lambda: torch.autograd.grad(fn(pred, imgs, mask, 16, True), pred))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mae_vit_b_step_kernels_vs_torch(benchmark, backend):
    from cxrfast.models import mae as build

    benchmark.group = "MAE ViT-B/16 training step, batch 256, bf16: cxrfast.ops on kernels vs torch"
    benchmark.name = f"cxrfast ops={backend}" if backend == "triton" else f"ops={backend}"
    ops.set_backend(backend)
    try:
        torch.manual_seed(0)
        model = build("vit_base", img_size=224).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        imgs = torch.randn(256, 1, 224, 224, device="cuda")

        def step():
            with torch.autocast("cuda", dtype=BF16):
                loss = model(imgs)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = _timed(benchmark, step, rounds=5)
        if t:
            benchmark.extra_info["img/s"] = round(256 / t)
    finally:
        ops.set_backend("auto")
