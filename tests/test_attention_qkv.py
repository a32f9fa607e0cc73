"""``cxrfast::attention_qkv``: attention on the packed qkv projection. The kernel (Triton
interpreter on CPU, fp32) and the reference against float64 torch, opcheck of both ops, and
the ViT's attention graph counted op by op: no select_backward, no zero-filled qkv-sized
gradient, no stack/cat, no copy of the attention output."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cxrfast import ops
from cxrfast.models.vit import Attention, Block
from kernels.attention import (attention_qkv, attention_qkv_backward_op, attention_qkv_op, attention_qkv_ref,
                               qkv_attention)
from test_kernels import DEV, poison  # noqa: F401  (poison: every kernel buffer starts as NaN)

KERNEL = [pytest.param(True, id="kernel"), pytest.param(False, id="reference")]


def _packed(b, n, h, d, strided, dtype=torch.float32):
    """qkv (B, N, 3*H*D); strided: a slice of a wider buffer with a token stride that is not
    3*H*D (as a fused projection's output would be)."""
    width = 3 * h * d
    if not strided:
        return torch.randn(b, n, width, device=DEV, dtype=dtype)
    wide = torch.randn(n, b, width + 24, device=DEV, dtype=dtype)
    return wide.transpose(0, 1)[:, :, 8:8 + width]


@pytest.mark.parametrize("kernel", KERNEL)
@pytest.mark.parametrize("n,h,d", [(1, 2, 32), (37, 3, 32), (64, 2, 16), (23, 2, 80), (50, 1, 64), (197, 1, 32)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_attention_qkv_fp32_against_float64(kernel, n, h, d, strided):
    qkv = _packed(2, n, h, d, strided)
    assert qkv.is_contiguous() != strided
    leaf = qkv.detach().requires_grad_()
    ref_leaf = qkv.detach().double().requires_grad_()
    out = attention_qkv(leaf, h, kernel=kernel)
    ref = attention_qkv_ref(ref_leaf, h)
    assert out.shape == (2, n, h * d) and out.is_contiguous()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(out)
    (g,), (gr,) = torch.autograd.grad(out, leaf, go), torch.autograd.grad(ref, ref_leaf, go.double())
    assert g.shape == qkv.shape and g.is_contiguous()
    assert not torch.isnan(g).any()
    torch.testing.assert_close(g.double(), gr, atol=5e-5, rtol=1e-4)


@pytest.fixture(params=["fused", "split"])
def backward_path(request, monkeypatch):
    """Runs a test with the one-pass backward where launch_configs chooses it ('fused') and
    again with the three launches forced everywhere ('split')."""
    from kernels import attention as ka

    if request.param == "split":
        monkeypatch.setattr(ka, "_fused_backward_config", lambda *a: None)
    return request.param


def _count_launches(monkeypatch):
    """{kernel name: launches} of the attention backward kernels, counted as they run."""
    from kernels import attention as ka

    counts = Counter()

    class Counted:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.fn[grid]

    for name in ("_attn_bwd_fused", "_attn_bwd_delta", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        monkeypatch.setattr(ka, name, Counted(name, getattr(ka, name)))
    return counts


@pytest.mark.parametrize("mode", ["dense", "mask", "varlen"])
@pytest.mark.parametrize("n,d", [(37, 16), (64, 32), (150, 16), (197, 32)])
def test_backward_paths_against_float64(mode, n, d, backward_path, monkeypatch):
    """The one-pass backward (up to 64 keys with D <= 64, 129-256 keys with D <= 32) and the
    three launches at the same shapes, every mode, against float64; B, H <= 2."""
    from kernels.attention import attention, attention_ref, uses_fused_backward

    fused = backward_path == "fused"
    assert uses_fused_backward(n, d, torch.float32) == fused
    b = 2 if n <= 64 else 1
    if mode == "varlen":
        cu = torch.tensor([0, n, n + n // 3 + 1][:b + 1], dtype=torch.int32)
        q, k, v = (torch.randn(int(cu[-1]), 2, d, device=DEV) for _ in range(3))
        kw, ref_kw = dict(cu_seqlens=cu.to(DEV), max_seqlen=n), dict(cu_seqlens=cu)
    else:
        q, k, v = (torch.randn(b, 2, n, d, device=DEV) for _ in range(3))
        kw = ref_kw = {}
        if mode == "mask":
            kpm = torch.rand(b, n, device=DEV) < 0.5
            kpm[0, :3] = True
            kpm[-1, -1] = False
            if b > 1:
                kpm[-1] = False  # nothing to attend to: zeros
            kw = ref_kw = dict(key_padding_mask=kpm)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention(*ins, **kw)
    ref = attention_ref(*ref_ins, **ref_kw)
    go = torch.randn_like(out)
    counts = _count_launches(monkeypatch)
    grads = torch.autograd.grad(out, ins, go)
    assert counts == (Counter(_attn_bwd_fused=1) if fused else
                      Counter(_attn_bwd_delta=1, _attn_bwd_dq=1, _attn_bwd_dkdv=1))
    for g, gr in zip(grads, torch.autograd.grad(ref, ref_ins, go.double())):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), gr, atol=5e-5, rtol=1e-4)


def test_fused_backward_is_sm_90_only_and_skips_the_shapes_that_spill():
    from kernels.attention import uses_fused_backward

    bf = torch.bfloat16
    assert uses_fused_backward(50, 64, bf) and uses_fused_backward(197, 32, bf)
    assert not any(uses_fused_backward(n, d, bf, cap) for n, d in ((50, 64), (197, 32)) for cap in ((8, 0), (8, 6), (8, 9)))
    assert not any(uses_fused_backward(n, d, bf) for n, d in ((257, 32), (197, 64), (65, 80), (600, 32)))


@pytest.mark.parametrize("mode", ["dense", "mask", "varlen"])
def test_key_block_loop_against_float64(mode, monkeypatch):
    """Sequences over 128 tokens with D <= 64 take the 64-row tiles that loop over key blocks
    (online softmax forward, dQ over key blocks): every mode against float64 (the backward
    forced to the three launches, so the dQ loop runs)."""
    from kernels import attention as ka
    from kernels.attention import attention, attention_ref, launch_configs

    monkeypatch.setattr(ka, "_fused_backward_config", lambda *a: None)
    n, d = 150, 32
    assert launch_configs(n, d, torch.float32)["fwd"].blocks["KV_LOOP"]
    assert launch_configs(n, d, torch.float32)["bwd_dq"].blocks["KV_LOOP"]
    kw = {}
    if mode == "varlen":
        cu = torch.tensor([0, n, n + 70, n + 71], dtype=torch.int32)
        q, k, v = (torch.randn(n + 71, 1, d, device=DEV) for _ in range(3))
        kw, ref_kw = dict(cu_seqlens=cu.to(DEV), max_seqlen=n), dict(cu_seqlens=cu)
    else:
        q, k, v = (torch.randn(2, 1, n, d, device=DEV) for _ in range(3))
        ref_kw = {}
        if mode == "mask":
            kpm = torch.rand(2, n, device=DEV) < 0.5
            kpm[-1] = False  # nothing to attend to: zeros
            kw = ref_kw = dict(key_padding_mask=kpm)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention(*ins, **kw)
    ref = attention_ref(*ref_ins, **ref_kw)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(out)
    for g, gr in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ref_ins, go.double())):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), gr, atol=5e-5, rtol=1e-4)


def test_attention_qkv_matches_the_attention_op_on_its_views():
    """Same kernels, other addressing: the packed op equals cxrfast::attention on q, k, v views."""
    from kernels.attention import attention

    qkv = _packed(2, 19, 2, 32, strided=False)
    views = qkv.unflatten(-1, (3, 2, 32)).permute(2, 0, 3, 1, 4)
    dense = attention(views[0], views[1], views[2]).transpose(1, 2).reshape(2, 19, 64)
    torch.testing.assert_close(attention_qkv(qkv, 2), dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNEL)
def test_opcheck_attention_qkv(kernel):
    qkv = _packed(2, 19, 2, 32, strided=True).cpu().requires_grad_()
    torch.library.opcheck(attention_qkv_op, (qkv, 2, 0.2, kernel))
    o, lse = attention_qkv_op(qkv.detach(), 2, 0.2, kernel)
    do = torch.randn_like(o)
    torch.library.opcheck(attention_qkv_backward_op, (do, qkv.detach(), o, lse, 2, 0.2, kernel))


@pytest.mark.parametrize("kernel", KERNEL)
@pytest.mark.parametrize("n,h,d", [(1, 2, 32), (37, 3, 32), (50, 2, 64), (197, 1, 32), (23, 2, 80)])
def test_qkv_attention_bias_gradient_against_float64(kernel, n, h, d, backward_path):
    """The bias gradient through the attention op (the one-pass kernel's token sums, or the
    reduction where the three launches run) equals float64 Linear + attention autograd."""
    torch.manual_seed(n * 7 + d)
    dim = h * d
    x, w, bias = torch.randn(2, n, dim), torch.randn(3 * dim, dim) / dim ** 0.5, torch.randn(3 * dim)
    leaves = [t.to(DEV).requires_grad_() for t in (x, w, bias)]
    refs = [t.double().requires_grad_() for t in (x, w, bias)]
    out = qkv_attention(*leaves, h, kernel=kernel)
    ref = attention_qkv_ref(torch.nn.functional.linear(*refs), h)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=1e-4)
    go = torch.randn(out.shape)
    grads = torch.autograd.grad(out, leaves, go.to(DEV))
    expected = torch.autograd.grad(ref, refs, go.double())
    for name, g, e in zip(("x", "weight", "bias"), grads, expected):
        assert not torch.isnan(g).any(), name
        torch.testing.assert_close(g.double().cpu(), e, atol=5e-5 * max(1.0, e.abs().max().item()), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_qkv_attention_uses_the_kernels_sums_where_the_one_pass_backward_runs(monkeypatch):
    """On the one-pass path the backward fills the per-sequence sums (no reduction over dqkv)."""
    from kernels import attention as ka

    filled = []
    launch = ka._launch_backward
    monkeypatch.setattr(ka, "_launch_backward", lambda *a, **k: filled.append(launch(*a, **k)) or filled[-1])
    x, w, bias = (torch.randn(2, 50, 128, device=DEV), torch.randn(384, 128, device=DEV),
                  torch.randn(384, device=DEV, requires_grad=True))
    qkv_attention(x, w, bias, 2, kernel=True).sum().backward()
    assert filled == [ka.uses_fused_backward(50, 64, torch.float32)] and filled[0]
    assert bias.grad.shape == (384,) and bias.grad.dtype == torch.float32


@pytest.mark.parametrize("kernel", KERNEL)
def test_opcheck_attention_qkv_with_bias(kernel):
    qkv = _packed(2, 19, 2, 32, strided=False).cpu().requires_grad_()
    bias = torch.randn(192, requires_grad=True)
    torch.library.opcheck(attention_qkv_op, (qkv, 2, 0.2, kernel, bias))
    o, lse = attention_qkv_op(qkv.detach(), 2, 0.2, kernel, bias.detach())
    torch.library.opcheck(attention_qkv_backward_op, (torch.randn_like(o), qkv.detach(), o, lse, 2, 0.2, kernel, True))


def test_attention_qkv_rejects_a_bias_of_the_wrong_size():
    with pytest.raises(ValueError, match="bias must be \\(96,\\)"):
        attention_qkv(torch.randn(1, 4, 96), 2, bias=torch.randn(95))


def test_attention_qkv_rejects_a_width_that_is_not_three_heads():
    with pytest.raises(ValueError, match="3\\*H\\*D"):
        attention_qkv(torch.randn(1, 4, 96), 5)


class _CountOps(TorchDispatchMode):
    """Counts each aten op with the numel of its output (the first tensor output)."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        numel = first.numel() if isinstance(first, torch.Tensor) else None
        self.seen[(func.overloadpacket.__name__, numel)] += 1
        return out


@pytest.fixture
def reference_ops():
    ops.set_backend("reference")
    yield
    ops.set_backend("auto")


@pytest.mark.parametrize("module", ["attention", "block"])
def test_vit_attention_graph_has_no_select_zeros_cat_or_output_copy(reference_ops, module):
    b, n, dim, heads = 2, 13, 48, 3
    torch.manual_seed(0)
    layer = Attention(dim, heads) if module == "attention" else Block(dim, heads)
    x = torch.randn(b, n, dim, requires_grad=True)
    counter = _CountOps()
    with counter:
        out = layer(x)
        out.backward(torch.randn_like(out))
    names = Counter(name for name, _ in counter.seen.elements())
    qkv_size, out_size = b * n * 3 * dim, b * n * dim
    for name in ("select_backward", "stack", "cat"):
        assert names[name] == 0, (name, names)
    for name in ("zeros", "new_zeros", "zeros_like", "zero_", "fill_"):
        assert counter.seen[(name, qkv_size)] == 0, (name, names)
    if module == "attention":  # in a Block the residual stream is also (B, N, dim): count Attention alone
        for name in ("clone", "copy_", "_to_copy", "contiguous"):
            assert counter.seen[(name, out_size)] == 0, (name, names)
        assert names["zeros"] == 0, names  # not even lse's unused gradient
    assert names["attention_qkv"] == 1 and names["attention_qkv_backward"] == 1, names
    assert x.grad is not None and not torch.isnan(x.grad).any()
