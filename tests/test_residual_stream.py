"""The ViT residual stream with every add fused into the LayerNorm after it
(cxrfast.models.vit.run_blocks): the same values and gradients as the plain block loop, no
separate adds left, and under autocast a 16-bit norm output beside an fp32 stream."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cxrfast import ops
from cxrfast.models.vit import Block, LayerNorm, run_blocks


@pytest.fixture
def backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend("auto")


def _stack(depth=3, dim=32, heads=4, seed=0):
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth))
    norm = LayerNorm(dim, eps=1e-6)
    for p in list(blocks.parameters()) + list(norm.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    return blocks, norm


@pytest.mark.parametrize("backend", ["reference", "torch"], indirect=True)
def test_fused_stack_equals_the_block_loop(backend):
    blocks, norm = _stack()
    x = torch.randn(2, 9, 32, requires_grad=True)
    y, out = run_blocks(blocks, x, norm)
    h = x
    for blk in blocks:
        h = blk(h)
    ref = norm(h)
    torch.testing.assert_close(out, h, rtol=0, atol=0)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    params = [x] + list(blocks.parameters()) + list(norm.parameters())
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Adds(TorchDispatchMode):
    """Counts full-size aten.add ops (the residual adds and gradient accumulations)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and out.numel() == self.numel:
            self.count += 1
        return out


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_no_separate_residual_adds_in_forward_or_backward(backend):
    """The plain loop makes one add per block forward and one gradient accumulation per
    block backward; fused, only the stack input's gradient is accumulated (its two users:
    norm1 and the first fused add)."""
    blocks, norm = _stack()
    x = torch.randn(2, 9, 32, requires_grad=True)
    counter = _Adds(x.numel())
    with counter:
        y, _ = run_blocks(blocks, x, norm)
        y.sum().backward()
    assert counter.count == 1


@pytest.mark.parametrize("backend", ["reference", "torch"], indirect=True)
def test_autocast_norms_write_16_bit_and_the_stream_stays_fp32(backend):
    blocks, norm = _stack()
    x = torch.randn(2, 9, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, out = run_blocks(blocks, x, norm)
        y_plain = norm(blocks[2](blocks[1](blocks[0](x))))
    assert y.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert y_plain.dtype == torch.float32  # a norm not feeding a matmul keeps the stream's dtype
    torch.testing.assert_close(y.float(), y_plain, atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
