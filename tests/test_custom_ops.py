"""The kernels as ``cxrfast::`` torch custom ops: schema, fake (meta) implementations and
autograd registrations checked by ``torch.library.opcheck``, the CPU references against
float64, and a whole MAE training step traced by ``torch.compile`` with no graph break."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cxrfast import ops
from cxrfast.models import mae
from kernels.attention import attention, attention_op, attention_ref
from kernels.layernorm import add_ln_op, layer_norm_ref, ln_op
from kernels.mae_loss import mae_loss_op, mae_loss_ref

KERNEL = [pytest.param(True, id="kernel"), pytest.param(False, id="reference")]


def _leaf(shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("kernel", KERNEL)
def test_opcheck_layer_norm(kernel):
    x, r = _leaf((3, 5, 37)), _leaf((3, 5, 37))
    w, b = _leaf(37), _leaf(37)
    torch.library.opcheck(ln_op, (x, w, b, 1e-6, None, kernel))
    torch.library.opcheck(add_ln_op, (x, r, w, b, 1e-6, None, None, kernel))
    # a strided x (the models pass views) and a promoted residual stream
    torch.library.opcheck(add_ln_op, (x.transpose(0, 1), _leaf((5, 3, 37), torch.float64), w, b, 1e-6, None,
                                      None, kernel))
    # y in a narrower dtype than the stream (autocast's matmul input); the float64 stream's
    # fp32 branch gets its gradient from the kernel's second store
    torch.library.opcheck(ln_op, (x.double(), w, b, 1e-6, torch.float32, kernel))
    torch.library.opcheck(add_ln_op, (x, _leaf((3, 5, 37), torch.float64), w, b, 1e-6, torch.float32, None, kernel))
    # the branch Linear's bias added (and its gradient summed) by the op
    torch.library.opcheck(add_ln_op, (x, r, w, b, 1e-6, None, _leaf(37), kernel))


@pytest.mark.parametrize("kernel", KERNEL)
@pytest.mark.parametrize("mode", ["dense", "mask", "varlen"])
def test_opcheck_attention(kernel, mode):
    cu, kpm, n = None, None, 19
    if mode == "varlen":
        cu = torch.tensor([0, 19, 23, 30], dtype=torch.int32)
        q, k, v = (_leaf((30, 2, 32)) for _ in range(3))
    else:
        qkv = _leaf((2, n, 3, 2, 32)).permute(2, 0, 3, 1, 4)  # strided q, k, v as in the ViT
        q, k, v = qkv[0], qkv[1], qkv[2]
        if mode == "mask":
            kpm = torch.rand(2, n) < 0.6
            kpm[-1] = False
    torch.library.opcheck(attention_op, (q, k, v, cu, n, kpm, 0.2, kernel))


@pytest.mark.parametrize("kernel", KERNEL)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_opcheck_mae_loss(kernel, norm_pix):
    imgs = torch.randn(2, 1, 32, 48)
    pred = _leaf((2, 7, 256))[:, 1:, :]  # strided, as the model passes it (CLS dropped)
    mask = (torch.rand(2, 6) < 0.6).float()
    mask[0, 0] = 1
    torch.library.opcheck(mae_loss_op, (pred, imgs, mask, 16, norm_pix, 1e-6, kernel))


@pytest.fixture
def reference_ops():
    """The custom ops with their torch references (the CPU registration), then back to auto."""
    from cxrfast import ops

    ops.set_backend("reference")
    yield
    ops.set_backend("auto")


def test_layer_norm_reference_op_against_float64(reference_ops):
    x, r, w, b = (torch.randn(s, dtype=torch.float64) for s in ((4, 3, 130), (4, 3, 130), 130, 130))
    ins = [t.float().requires_grad_() for t in (x, r, w, b)]
    ref_ins = [t.clone().requires_grad_() for t in (x, r, w, b)]
    y, h = ops.add_layer_norm(*ins)  # cxrfast::add_layer_norm, kernel=False
    ry, rh = layer_norm_ref(ref_ins[0], ref_ins[2], ref_ins[3], 1e-6, residual=ref_ins[1])
    torch.testing.assert_close(y.double(), ry, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), rh, atol=1e-6, rtol=1e-6)
    gy = torch.randn_like(ry)
    for g, gr in zip(torch.autograd.grad((y, h), ins, (gy.float(), gy.float())),
                     torch.autograd.grad((ry, rh), ref_ins, (gy, gy))):
        torch.testing.assert_close(g.double(), gr, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "mask", "varlen"])
def test_attention_reference_op_against_float64(mode):
    kw, ref_kw = {}, {}
    if mode == "varlen":
        cu = torch.tensor([0, 11, 12, 20], dtype=torch.int32)
        shape = (20, 3, 16)
        kw, ref_kw = dict(cu_seqlens=cu, max_seqlen=11), dict(cu_seqlens=cu)
    else:
        shape = (2, 3, 11, 16)
        if mode == "mask":
            kpm = torch.rand(2, 11) < 0.6
            kpm[-1] = False  # nothing to attend to: zeros
            kw = ref_kw = dict(key_padding_mask=kpm)
    ref_ins = [torch.randn(shape, dtype=torch.float64).requires_grad_() for _ in range(3)]
    ins = [t.detach().float().requires_grad_() for t in ref_ins]
    out = attention(*ins, kernel=False, **kw)
    ref = attention_ref(*ref_ins, **ref_kw)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    go = torch.randn_like(ref)
    for g, gr in zip(torch.autograd.grad(out, ins, go.float()), torch.autograd.grad(ref, ref_ins, go)):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), gr, atol=1e-5, rtol=1e-5)


def test_mae_loss_reference_op_gradient_is_autograd_of_the_reference(reference_ops):
    imgs = torch.randn(3, 2, 15, 10, dtype=torch.float64)
    pred = torch.randn(3, 6, 50, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 6) < 0.5).double()
    mask[0, 0] = 1
    out = ops.mae_loss(pred, imgs, mask, 5, True)
    ref = mae_loss_ref(pred, imgs, mask, 5, True)
    assert out.dtype == torch.float64 and out.item() == pytest.approx(ref.item(), rel=1e-12)
    (g,), (gr,) = torch.autograd.grad(out, pred), torch.autograd.grad(ref, pred)
    torch.testing.assert_close(g, gr, atol=1e-15, rtol=1e-12)


def _tiny_mae():
    torch.manual_seed(0)
    return mae("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)


def _step(model, imgs):
    loss, _, _ = model(imgs)
    loss.backward()
    return loss.detach()


def test_training_step_compiles_with_no_graph_break(reference_ops):
    """MAE forward + loss (explain: 0 breaks, the cxrfast ops in the graph) and its backward
    (AOTAutograd's traced backward holds the ops' backward ops); gradients equal eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model, imgs = _tiny_mae(), torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16)

    def forward(imgs, noise):
        return model(imgs, noise=noise)[0]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(imgs, noise)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, _inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm)
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")),
                             fullgraph=True)
    loss = compiled(imgs, noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    eager = forward(imgs, noise)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)

    def targets(kind):
        return {str(node.target) for g in graphs[kind] for node in g.graph.nodes if node.op == "call_function"}

    fw, bw = targets("fw"), targets("bw")
    assert {"cxrfast.attention_qkv.default", "cxrfast.layer_norm.default", "cxrfast.add_layer_norm.default",
            "cxrfast.mlp.default", "cxrfast.mae_loss.default", "cxrfast.mae_unshuffle.default"} <= fw, fw
    assert {"cxrfast.attention_qkv_backward.default", "cxrfast.layer_norm_backward.default",
            "cxrfast.mlp_backward.default", "cxrfast.mae_loss_backward.default",
            "cxrfast.mae_unshuffle_backward.default"} <= bw, bw
    assert not {t for t in bw if "scatter" in t or "index_put" in t}, bw


def test_importing_cxrfast_and_kernels_imports_no_triton_compiler_and_no_cuda():
    code = ("import sys, torch; import cxrfast, cxrfast.ops, cxrfast.models; assert 'triton' not in sys.modules; "
            "import kernels.attention, kernels.layernorm, kernels.mae_loss, kernels.mlp; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_mae_pretraining_runs_where_triton_is_not_installed(tmp_path):
    """Triton is a Linux-only dependency: the model and its loss must work without it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, NoTriton())
        import torch
        from cxrfast.models import mae
        model = mae("vit_tiny", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
        loss = model(torch.randn(2, 1, 32, 32))[0]
        loss.backward()
        assert "triton" not in sys.modules
        print("ok", float(loss))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


def test_fp32_attention_on_a_gpu_goes_to_sdpa_under_auto(monkeypatch):
    """The kernel's IEEE fp32 tiles spill kilobytes on sm_80/sm_90 (bench/gpu_static.py), so
    under auto only bf16/fp16 reach it; CXRFAST_OPS=triton still forces it (the interpreter tests)."""
    from kernels import attention as ka

    calls = []
    monkeypatch.setattr(ops, "_kernel_flag", lambda t: True)  # as on a CUDA tensor under auto
    monkeypatch.setattr(ka, "attention", lambda *a, **k: calls.append(1) or a[0])
    q = torch.randn(1, 2, 5, 16)
    ops.attention(q, q, q)
    assert calls == []
    ops.set_backend("triton")
    try:
        ops.attention(q, q, q)
    finally:
        ops.set_backend("auto")
    assert calls == [1]
