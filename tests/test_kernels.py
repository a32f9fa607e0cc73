"""Triton kernels against float64 torch references, on fresh random inputs with poisoned
outputs; on CPU through the Triton interpreter (fp32), on GPU also in bf16/fp16 against
torch's own same-dtype error."""
from __future__ import annotations

import pytest
import torch

from kernels.attention import attention, attention_ref
from kernels.layernorm import layer_norm, layer_norm_ref
from kernels.mae_loss import mae_loss, mae_loss_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a kernel allocates starts as NaN: an element it forgets to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (13, 193), (5, 768), (4, 1031), (2, 2048)])
@pytest.mark.parametrize("residual", [False, True])
def test_layernorm_fp32_against_float64(rows, n, residual):
    x = torch.randn(rows, 3, n, device=DEV) * 3 + 1
    r = torch.randn(rows, 3, n, device=DEV) if residual else None
    w, b = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    ins = [_leaf(x), _leaf(w), _leaf(b)] + ([_leaf(r)] if residual else [])
    ref_ins = [_leaf(t, torch.float64) for t in ins]
    out = layer_norm(ins[0], ins[1], ins[2], 1e-6, ins[3] if residual else None)
    ref = layer_norm_ref(ref_ins[0], ref_ins[1], ref_ins[2], 1e-6, ref_ins[3] if residual else None)
    outs, refs = (out, ref) if residual else ((out,), (ref,))
    for o, rr in zip(outs, refs):
        assert not torch.isnan(o).any()
        torch.testing.assert_close(o.double(), rr, atol=1e-5, rtol=1e-5)
    gos = [torch.randn_like(o) for o in outs]
    for g, gr in zip(_grads(outs, ins, gos), _grads(refs, ref_ins, [t.double() for t in gos])):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), gr, atol=2e-4 * max(1, n ** 0.5), rtol=1e-4)


def _attn_case(mode, n, d, b=2, h=3):
    if mode == "varlen":
        lens = torch.randint(1, n + 1, (b + 1,))
        lens[0] = n
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        q, k, v = (torch.randn(int(cu[-1]), h, d, device=DEV) for _ in range(3))
        return (q, k, v), dict(cu_seqlens=cu.to(DEV), max_seqlen=n), dict(cu_seqlens=cu)
    q, k, v = (torch.randn(b, h, n, d, device=DEV) for _ in range(3))
    if mode == "mask":
        kpm = torch.rand(b, n, device=DEV) < 0.6
        kpm[0] = True
        kpm[-1] = False  # a sequence with nothing to attend to: zeros, not NaN
        return (q, k, v), dict(key_padding_mask=kpm), dict(key_padding_mask=kpm)
    return (q, k, v), {}, {}


@pytest.mark.parametrize("mode", ["dense", "mask", "varlen"])
@pytest.mark.parametrize("n,d", [(1, 32), (17, 64), (50, 64), (37, 80), (23, 128)])
def test_attention_fp32_against_float64(mode, n, d):
    (q, k, v), kw, ref_kw = _attn_case(mode, n, d)
    ins = [_leaf(t) for t in (q, k, v)]
    ref_ins = [_leaf(t, torch.float64) for t in (q, k, v)]
    out = attention(*ins, **kw)
    ref = attention_ref(*ref_ins, **{k_: (v_.cpu() if k_ == "cu_seqlens" else v_) for k_, v_ in ref_kw.items()})
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(out)
    for g, gr in zip(_grads(out, ins, go), _grads(ref, ref_ins, go.double())):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), gr, atol=5e-5, rtol=1e-4)


def test_attention_on_a_permuted_qkv_view():
    """The models pass q, k, v as views of one qkv tensor: strided, not dense."""
    qkv = torch.randn(2, 19, 3, 4, 32, device=DEV).permute(2, 0, 3, 1, 4)
    ins = [_leaf(qkv)]
    q, k, v = ins[0][0], ins[0][1], ins[0][2]
    out = attention(q, k, v)
    ref_leaf = _leaf(qkv, torch.float64)
    ref = attention_ref(ref_leaf[0], ref_leaf[1], ref_leaf[2])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(out)
    (g,), (gr,) = _grads(out, ins, go), _grads(ref, [ref_leaf], go.double())
    torch.testing.assert_close(g.double(), gr, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("c,p,hw", [(1, 16, (32, 48)), (3, 4, (12, 8)), (1, 5, (15, 10)), (2, 3, (9, 9)), (1, 14, (28, 28))])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_fp32_against_float64(c, p, hw, norm_pix):
    b = 3
    length = (hw[0] // p) * (hw[1] // p)
    imgs = torch.randn(b, c, *hw, device=DEV)
    pred = torch.randn(b, length, p * p * c, device=DEV)
    mask = (torch.rand(b, length, device=DEV) < 0.7).float()
    mask[0, 0] = 1
    ins, ref_ins = [_leaf(pred)], [_leaf(pred, torch.float64)]
    out = mae_loss(ins[0], imgs, mask, p, norm_pix)
    ref = mae_loss_ref(ref_ins[0], imgs.double(), mask.double(), p, norm_pix)
    assert abs(out.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    (g,), (gr,) = _grads(out, ins, torch.tensor(1.7, device=DEV)), _grads(ref, ref_ins, torch.tensor(1.7, dtype=torch.float64))
    assert not torch.isnan(g).any()
    torch.testing.assert_close(g.double(), gr, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("c,p,hw", [(1, 4, (12, 8)), (3, 3, (9, 6))])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_never_reads_visible_patches(c, p, hw, norm_pix):
    """NaN in every visible patch of pred and image (mask 0) reaches neither the loss nor
    d(pred): the kernels must not load them; d(pred)'s visible rows are exactly 0."""
    b = 2
    gh, gw = hw[0] // p, hw[1] // p
    imgs = torch.randn(b, c, *hw, device=DEV)
    pred = torch.randn(b, gh * gw, p * p * c, device=DEV)
    mask = (torch.rand(b, gh * gw, device=DEV) < 0.6).float()
    mask[:, 0], mask[:, 1] = 1, 0
    ref_leaf = _leaf(pred, torch.float64)
    ref = mae_loss_ref(ref_leaf, imgs.double(), mask.double(), p, norm_pix)
    (gr,) = _grads(ref, [ref_leaf], torch.tensor(1.3, dtype=torch.float64))
    visible = mask == 0
    pred[visible] = float("nan")
    pix = visible.reshape(b, gh, 1, gw, 1).expand(b, gh, p, gw, p).reshape(b, 1, *hw).expand(b, c, *hw)
    imgs = imgs.masked_fill(pix, float("nan"))
    leaf = _leaf(pred)
    out = mae_loss(leaf, imgs, mask, p, norm_pix)
    (g,) = _grads(out, [leaf], torch.tensor(1.3, device=DEV))
    assert abs(out.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    assert torch.equal(g[visible], torch.zeros_like(g[visible]))
    torch.testing.assert_close(g.double(), gr, atol=1e-7, rtol=1e-5)


def test_ops_dispatch_switch(monkeypatch):
    from cxrfast import ops

    calls = []
    import kernels.layernorm as kl

    monkeypatch.setattr(kl, "layer_norm", lambda *a, kernel, out_dtype=None, **k: calls.append(kernel) or layer_norm_ref(*a, **k))
    x, w, b = torch.randn(4, 8), torch.ones(8), torch.zeros(8)
    ops.set_backend("torch")
    ops.layer_norm(x, w, b)
    assert not calls
    ops.set_backend("triton")
    try:
        ops.layer_norm(x, w, b)
        ops.set_backend("reference")
        ops.layer_norm(x, w, b)  # the custom op with its torch reference
    finally:
        ops.set_backend("auto")
    ops.layer_norm(x, w, b)  # auto on CPU: plain F.layer_norm, no custom op
    assert calls == [True, False]
    with pytest.raises(ValueError):
        ops.set_backend("cuda")


def test_attention_refuses_tiles_too_big_and_ops_falls_back(monkeypatch):
    from cxrfast import ops
    from kernels import attention as ka

    assert ka.fits(197, 128, torch.bfloat16) and ka.fits(512, 64, torch.float16) and ka.fits(50, 64, torch.float32)
    assert not ka.fits(257, 80, torch.bfloat16)  # ViT-H/14 at 224, fine-tuning: 512 x 128 tile
    assert not ka.fits(513, 64, torch.float16) and not ka.fits(50, 8, torch.float32)
    q = torch.randn(1, 2, 300, 128)
    with pytest.raises(ValueError, match="KiB"):
        attention(q, q, q)
    calls = []
    monkeypatch.setattr(ka, "attention", lambda *a, kernel, **k: calls.append(kernel) or attention_ref(*a, **k))
    ops.set_backend("triton")
    try:
        out = ops.attention(q, q, q)  # too big: SDPA
        small = torch.randn(1, 2, 20, 32)
        ops.attention(small, small, small)  # fits: the kernel
    finally:
        ops.set_backend("auto")
    torch.testing.assert_close(out, attention_ref(q, q, q), atol=1e-5, rtol=1e-5)
    assert calls == [True]


# ---- GPU: bf16 / fp16 error no worse than 2x torch's own same-dtype error (+ small atol) ----

def _fair(kernel_out, torch_out, fp32_ref, atol):
    err_k = (kernel_out.float() - fp32_ref).abs().max().item()
    err_t = (torch_out.float() - fp32_ref).abs().max().item()
    assert err_k <= 2 * err_t + atol, (err_k, err_t)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [768, 512, 1024, 1000])
def test_layernorm_half_precision(dtype, n):
    x, r = torch.randn(256 * 50, n, device="cuda", dtype=dtype), torch.randn(256 * 50, n, device="cuda", dtype=dtype)
    w, b = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    y, h = layer_norm(x, w, b, 1e-6, r)
    ref_y, _ = layer_norm_ref(x, w, b, 1e-6, r, upcast=True)
    torch_y, _ = layer_norm_ref(x, w, b, 1e-6, r)
    _fair(y, torch_y, ref_y.float(), 1e-2)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(50, 64), (197, 64), (50, 80), (197, 128)])
def test_attention_half_precision(dtype, n, d):
    q, k, v = (torch.randn(64, 12, n, d, device="cuda", dtype=dtype) for _ in range(3))
    ins = [_leaf(t) for t in (q, k, v)]
    out = attention(*ins)
    ref = attention_ref(q.float(), k.float(), v.float())
    torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    _fair(out, torch_out, ref, 1e-3)
    go = torch.randn_like(out)
    g = _grads(out, ins, go)
    ref_ins = [_leaf(t, torch.float32) for t in (q, k, v)]
    gr = _grads(attention_ref(*ref_ins), ref_ins, go.float())
    tin = [_leaf(t) for t in (q, k, v)]
    gt = _grads(torch.nn.functional.scaled_dot_product_attention(*tin), tin, go)
    for a, t_, r_ in zip(g, gt, gr):
        _fair(a, t_, r_, 1e-2)


_PAIRS = [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float16, torch.float32),
          (torch.float32, torch.float16), (torch.float32, torch.float32)]


@pytest.mark.parametrize("x_dtype,r_dtype", _PAIRS)
def test_layernorm_residual_stream_keeps_the_promoted_dtype(x_dtype, r_dtype):
    """A low-precision branch added to a wider residual stream must not narrow the stream
    (the ViT block passes the bf16 branch as x and the fp32 stream as residual)."""
    n = 96
    x = _leaf(torch.randn(7, n, device=DEV) * 2, x_dtype)
    r = _leaf(torch.randn(7, n, device=DEV), r_dtype)
    w, b = _leaf(torch.randn(n, device=DEV)), _leaf(torch.randn(n, device=DEV))
    y, h = layer_norm(x, w, b, 1e-6, residual=r)
    th = x + r  # the torch path of cxrfast.ops.add_layer_norm
    ty = torch.nn.functional.layer_norm(th, (n,), w.to(th.dtype), b.to(th.dtype), 1e-6)
    assert (y.dtype, h.dtype) == (ty.dtype, th.dtype) == (torch.result_type(x, r),) * 2
    torch.testing.assert_close(h, x.detach().to(h.dtype) + r.detach().to(h.dtype), rtol=0, atol=0)
    # y from the rounded h, compared with float64 LayerNorm of that same h
    ref = torch.nn.functional.layer_norm(h.detach().double(), (n,), w.detach().double(), b.detach().double(), 1e-6)
    torch.testing.assert_close(y.double(), ref, atol=1e-4 if h.dtype == torch.float16 else 1e-5, rtol=1e-3)
    gx, gr = torch.autograd.grad((y.float().sum() + h.float().square().sum()), (x, r))
    assert (gx.dtype, gr.dtype) == (x_dtype, r_dtype)
    tgx, tgr = torch.autograd.grad((ty.float().sum() + th.float().square().sum()), (x, r))
    torch.testing.assert_close(gx.double(), tgx.double(), atol=2e-2 if torch.float16 in (x_dtype, r_dtype) else 1e-4,
                               rtol=1e-3)
    torch.testing.assert_close(gr.double(), tgr.double(), atol=2e-2 if torch.float16 in (x_dtype, r_dtype) else 1e-4,
                               rtol=1e-3)


@pytest.mark.parametrize("residual", [False, True])
def test_layernorm_writes_y_in_the_matmul_dtype(residual):
    """out_dtype (autocast's matmul dtype) must be exactly the fp32 result rounded once, and a
    16-bit dy must give the gradients its fp32 upcast gives: the same math, less traffic."""
    n = 96
    half = torch.float16  # the interpreter converts fp16 (no bf16 arithmetic there)
    x = _leaf(torch.randn(7, n, device=DEV) * 2, half if residual else torch.float32)
    r = _leaf(torch.randn(7, n, device=DEV)) if residual else None
    w, b = _leaf(torch.randn(n, device=DEV)), _leaf(torch.randn(n, device=DEV))
    wide = layer_norm(x, w, b, 1e-6, r)
    narrow = layer_norm(x, w, b, 1e-6, r, out_dtype=half)
    y_wide, y_narrow = (wide[0], narrow[0]) if residual else (wide, narrow)
    assert y_narrow.dtype == half and y_wide.dtype == torch.float32
    assert torch.equal(y_narrow, y_wide.detach().to(half))
    if residual:
        assert narrow[1].dtype == torch.float32 and torch.equal(narrow[1], wide[1])
    dy = torch.randn(7, n, device=DEV).to(half)
    ins = (x, w, b) + ((r,) if residual else ())
    g_narrow = torch.autograd.grad(y_narrow, ins, dy)
    g_wide = torch.autograd.grad(y_wide, ins, dy.float())
    for a, c in zip(g_narrow, g_wide):
        assert a.dtype == c.dtype and not torch.isnan(a).any()
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_layernorm_adds_the_branch_bias_and_sums_its_gradient():
    """branch_bias: h = (x + bias) + residual in h's dtype, and d(bias) = column sums of dh,
    against float64; a fp16 branch beside an fp32 stream, as the ViT's attention projection."""
    n = 96
    x = _leaf(torch.randn(2, 7, n, device=DEV), torch.float16)
    r = _leaf(torch.randn(2, 7, n, device=DEV))
    w, b, bb = (_leaf(torch.randn(n, device=DEV)) for _ in range(3))
    y, h = layer_norm(x, w, b, 1e-6, r, branch_bias=bb)
    x64, r64, w64, b64, bb64 = (_leaf(t, torch.float64) for t in (x, r, w, b, bb))
    h64 = (x64 + bb64) + r64
    y64 = torch.nn.functional.layer_norm(h64, (n,), w64, b64, 1e-6)
    assert h.dtype == torch.float32 and not torch.isnan(y).any()
    torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-4)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), (x, r, w, b, bb), (gy, gh))
    refs = torch.autograd.grad((y64, h64), (x64, r64, w64, b64, bb64), (gy.double(), gh.double()))
    for g, ref in zip(grads, refs):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), ref, atol=2e-2 if g.dtype == torch.float16 else 1e-3, rtol=1e-3)
    assert grads[4].dtype == bb.dtype
