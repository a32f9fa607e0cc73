"""kernels/mlp.py: the fused MLP kernels against float64 torch on fresh random inputs with
poisoned outputs (on CPU through the Triton interpreter, fp32), the ``cxrfast::mlp`` op's
registration (opcheck), autocast dtypes, launch configurations, and the ViT Block on it."""
from __future__ import annotations

import pytest
import torch

from cxrfast import ops
from cxrfast.models.vit import Block, Mlp
from kernels import launch
from kernels.mlp import gelu_grad, launch_config, mlp, mlp_backward_op, mlp_op, mlp_ref
from test_kernels import _fair  # noqa: E402  (the same fairness rule for every kernel)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a kernel allocates starts as NaN: an element it forgets to write shows."""
    empty = torch.empty

    def fill(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", fill)


@pytest.fixture
def backend():
    """Sets a cxrfast.ops backend for one test, then back to auto."""
    yield ops.set_backend
    ops.set_backend("auto")


def _params(d_in, hidden, d_out, dtype=torch.float64, device=DEV):
    g = torch.Generator().manual_seed(hash((d_in, hidden, d_out)) % 2**31)
    shapes = ((hidden, d_in), (hidden,), (d_out, hidden), (d_out,))
    scales = (d_in ** -0.5, 1.0, hidden ** -0.5, 1.0)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * c).to(device, dtype) for s, c in zip(shapes, scales)]


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


@pytest.mark.parametrize("lead,d_in,hidden,d_out", [((37,), 24, 96, 24), ((1,), 16, 64, 16), ((2, 19), 24, 96, 40),
                                                    ((150,), 40, 200, 33), ((3, 5), 7, 13, 5)])
def test_mlp_fp32_against_float64(lead, d_in, hidden, d_out):
    """Forward and all five gradients, sizes off the block multiples (edges masked, several
    row and column blocks, a K loop of more than one step)."""
    x = torch.randn(*lead, d_in, device=DEV, dtype=torch.float64) * 2
    ref_ins = [_leaf(t) for t in [x, *_params(d_in, hidden, d_out)]]
    ins = [_leaf(t, torch.float32) for t in ref_ins]
    out = mlp(*ins)  # kernel=True: the Triton kernels
    ref = mlp_ref(*ref_ins)
    assert out.shape == ref.shape and out.dtype == torch.float32 and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    go = torch.randn_like(ref)
    for name, g, gr in zip(("x", "w1", "b1", "w2", "b2"), torch.autograd.grad(out, ins, go.float()),
                           torch.autograd.grad(ref, ref_ins, go)):
        assert g.dtype == torch.float32 and not torch.isnan(g).any(), name
        torch.testing.assert_close(g.double(), gr, atol=5e-5 * max(1.0, lead[0] ** 0.5), rtol=1e-4, msg=name)


def test_kernel_outputs_h_and_a_and_the_backward_op():
    """The op's saved h and a are fc1(x) and gelu(fc1(x)); the backward op's dh path
    (gelu' in the epilogue, db1 from per-row-block partials) matches float64."""
    x = torch.randn(70, 24, dtype=torch.float64, device=DEV)
    w1, b1, w2, b2 = _params(24, 80, 24)
    z, h, a = mlp_op(*(t.float() for t in (x, w1, b1, w2, b2)), True)
    h_ref = x @ w1.T + b1
    torch.testing.assert_close(h.double(), h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.double(), torch.nn.functional.gelu(h_ref), atol=1e-5, rtol=1e-5)
    dz = torch.randn(70, 24, dtype=torch.float64, device=DEV)
    dx, dw1, db1, dw2, db2 = mlp_backward_op(dz.float(), x.float(), w1.float(), w2.float(), h, a, True)
    dh = (dz @ w2) * gelu_grad(h.double())
    torch.testing.assert_close(db1.double(), dh.sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dw1.double(), dh.T @ x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dx.double(), dh @ w1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw2.double(), dz.T @ a.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db2.double(), dz.sum(0), atol=1e-5, rtol=1e-5)


def test_gelu_grad_is_the_derivative_of_exact_gelu():
    h = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.gelu(h).sum(), h)
    torch.testing.assert_close(gelu_grad(h.detach()), g, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kernel", [pytest.param(False, id="reference"), pytest.param(True, id="kernel")])
def test_opcheck_mlp(kernel):
    w1, b1, w2, b2 = (_leaf(t, torch.float32) for t in _params(24, 40, 24, device="cpu"))
    x = _leaf(torch.randn(3, 5, 24))
    torch.library.opcheck(mlp_op, (x, w1, b1, w2, b2, kernel))
    torch.library.opcheck(mlp_op, (x.transpose(0, 1), w1, b1, w2, b2, kernel))  # a strided x


def test_reference_op_gradient_is_autograd_of_the_reference():
    x = torch.randn(4, 9, 16, dtype=torch.float64, requires_grad=True)
    params = [_leaf(t) for t in _params(16, 48, 20, device="cpu")]
    out = mlp(x, *params, kernel=False)
    ref = mlp_ref(x, *params)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    go = torch.randn_like(ref)
    for g, gr in zip(torch.autograd.grad(out, [x, *params], go), torch.autograd.grad(ref, [x, *params], go)):
        torch.testing.assert_close(g, gr, atol=1e-12, rtol=1e-10)


def test_autocast_casts_like_f_linear_and_grads_keep_the_parameters_dtype(backend):
    """Under (CPU) autocast the op computes in bf16 as F.linear would, returns bf16, and the
    fp32 master parameters get fp32 gradients close to the plain torch path's."""
    backend("reference")
    mod = Mlp(32, 128)
    x = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in mod.named_parameters()}
    mod.zero_grad()
    backend("torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = mod(x)
    assert ref.dtype == torch.bfloat16
    ref.float().square().sum().backward()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)
    for n, p in mod.named_parameters():
        assert grads[n].dtype == p.dtype == torch.float32, n
        torch.testing.assert_close(grads[n], p.grad, atol=5e-2, rtol=5e-2, msg=n)


def test_block_forward_backward_reference_equals_torch(backend):
    torch.manual_seed(0)
    block = Block(48, 4).double()
    x = torch.randn(3, 11, 48, dtype=torch.float64)
    results = []
    for name in ("reference", "torch"):
        backend(name)
        block.zero_grad()
        xi = _leaf(x)
        out = block(xi)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    torch.testing.assert_close(o1, o2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx1, gx2, atol=1e-11, rtol=1e-11)
    for n in gp1:
        torch.testing.assert_close(gp1[n], gp2[n], atol=1e-10, rtol=1e-10, msg=n)


def test_ops_dispatch(backend, monkeypatch):
    import kernels.mlp as km

    calls = []
    monkeypatch.setattr(km, "mlp", lambda *a, kernel: calls.append(kernel) or mlp_ref(*a))
    x, params = torch.randn(4, 8), _params(8, 32, 8, torch.float32, "cpu")
    for name in ("torch", "auto", "reference", "triton"):
        backend(name)
        torch.testing.assert_close(ops.mlp(x, *params), mlp_ref(x, *params))
    assert calls == [False, True]  # torch and auto on CPU: plain F.linear, no custom op
    monkeypatch.setattr(ops, "_kernel_flag", lambda t: True)  # as on a CUDA tensor under auto
    backend("auto")
    ops.mlp(x, *params)
    assert calls == [False, True]  # fp32 on a GPU under auto: cuBLAS, not the CUDA-core fp32 kernel


def test_mlp_rejects_shapes_that_do_not_chain():
    w1, b1, w2, b2 = _params(8, 32, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="chain"):
        mlp(torch.randn(3, 9), w1, b1, w2, b2, kernel=False)
    with pytest.raises(ValueError, match="chain"):
        mlp(torch.randn(3, 8), w1, b1, w2[:, :16], b2, kernel=False)


# ---- launch configuration (pure: no GPU) ----

_MODEL_SHAPES = [(256 * 50, 3072, 768), (256 * 50, 4096, 1024), (256 * 65, 5120, 1280), (256 * 197, 2048, 512),
                 (256 * 197, 3072, 768), (256 * 785, 3072, 768)]


@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (8, 9), (8, 6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_launch_config_pipeline_fits_the_targets_shared_memory(cap, dtype):
    for m, n, k in _MODEL_SHAPES + [(k, n, m) for m, n, k in _MODEL_SHAPES[:2]]:  # forward (m, n, k) and transposed
        cfg = launch_config(m, n, k, dtype, cap)
        b = cfg.blocks
        pipeline = (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"] * 2 * cfg.num_stages
        assert pipeline <= launch.SMEM_PER_BLOCK[cap], (m, n, k, cfg)
        assert cfg.num_stages >= 2 and cfg.num_warps == 8
    hopper = launch_config(256 * 50, 3072, 768, dtype, (9, 0))
    assert (hopper.blocks["BLOCK_M"], hopper.blocks["BLOCK_N"], hopper.num_warps) == (128, 128, 8)
    assert hopper.num_stages >= 3


def test_launch_config_fp32_keeps_interpreter_tiles_small():
    cfg = launch_config(37, 96, 24, torch.float32)
    assert cfg.blocks["BLOCK_M"] == 64 and cfg.blocks["BLOCK_N"] == 64 and cfg.blocks["BLOCK_K"] == 32
    assert launch_config(5, 13, 7, torch.float32).blocks == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}


# ---- GPU: bf16 / fp16 error no worse than 2x torch's own same-dtype error (+ small atol) ----



@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,d,hidden", [(64 * 50, 768, 3072), (16 * 197, 512, 2048), (1000, 1024, 4096), (77, 200, 300)])
def test_mlp_half_precision(dtype, m, d, hidden):
    x = torch.randn(m, d, device="cuda", dtype=dtype)
    params = [t.to(dtype) for t in _params(d, hidden, d, torch.float32, "cuda")]
    ins = [_leaf(t) for t in [x, *params]]
    out = mlp(*ins)
    ref_ins = [_leaf(t, torch.float32) for t in [x, *params]]
    ref = mlp_ref(*ref_ins)
    tin = [_leaf(t) for t in [x, *params]]
    torch_out = mlp_ref(*tin)
    _fair(out, torch_out, ref, 1e-3)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, go)
    refs = torch.autograd.grad(ref, ref_ins, go.float())
    tgrads = torch.autograd.grad(torch_out, tin, go)
    for g, t_, r_ in zip(grads, tgrads, refs):
        assert g.dtype == dtype
        _fair(g, t_, r_, 1e-2)


@gpu_only
def test_mlp_under_cuda_autocast_returns_the_autocast_dtype():
    mod = Mlp(256, 1024).cuda()
    x = torch.randn(4, 50, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mod(x)
        ref = mod.fc2(mod.act(mod.fc1(x)))
    assert out.dtype == ref.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mod.parameters())
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)
