"""Fused MAE loss: patchify the target, normalise each patch (norm_pix), squared error against
the prediction, mean over masked patches — without writing the patchified target anywhere.

Layout as facebookresearch/mae, for any channel count C: imgs (B, C, H, W); pred (B, L, p*p*C)
with patches row-major and (row, column, channel) order inside a patch; mask (B, L) with
1 = masked. norm_pix uses each patch's own mean and unbiased variance:
(t - mean) / sqrt(var + eps).

One program per patch: it gathers the patch from the image by index arithmetic, forms the
target in registers, and writes one fp32 number (its masked loss). The backward recomputes
the target the same way and writes d(pred). Only masked patches count, so a program whose
patch is visible (mask 0, 25 % of them at mask ratio 0.75) loads neither pred nor image: the
forward writes 0 for it, the backward writes a zero row of d(pred). Design limit: p*p*C <= MAX_P = 16384.

The op ``cxrfast::mae_loss`` runs the kernel or, with ``kernel=False``, the torch reference
kept here (``mae_loss_ref``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Config
from kernels.library import define, no_autocast
from kernels.patches import mae_loss_ref, target as _target  # noqa: F401  (mae_loss_ref re-exported)

MAX_P = 16384  # values in one patch, p*p*C


@triton.jit
def _residual(PRED, IMG, pid, stride_pb, stride_pl, stride_ib, stride_ic, stride_ih, stride_iw,
              L, GW, C, PATCH, P, eps, NORM_PIX: tl.constexpr, BLOCK_P: tl.constexpr):
    """pred - target for patch ``pid`` (= b * L + l), 0 past P; the target is gathered from
    the image by index arithmetic and normalised in registers."""
    b = pid // L
    l = pid % L
    j = tl.arange(0, BLOCK_P)
    valid = j < P
    gh = l // GW
    gw = l % GW
    pi = j // (PATCH * C)
    pj = (j // C) % PATCH
    c = j % C
    ptr = IMG + b * stride_ib + c * stride_ic + (gh * PATCH + pi) * stride_ih + (gw * PATCH + pj) * stride_iw
    t = tl.load(ptr, mask=valid, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=0) / P
        tc = tl.where(valid, t - mean, 0.0)
        var = tl.sum(tc * tc, axis=0) / (P - 1)
        t = tc / tl.sqrt(var + eps)
    p = tl.load(PRED + b * stride_pb + l * stride_pl + j, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, p - t, 0.0), b, l, j, valid


@triton.jit
def _mae_fwd(PRED, IMG, MASK, LOSS,  # PRED (B, L, P); IMG (B, C, H, W); MASK (B*L,) fp32; LOSS (B*L,) fp32
             stride_pb, stride_pl, stride_ib, stride_ic, stride_ih, stride_iw,
             L, GW, C, PATCH, P, eps, NORM_PIX: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.load(MASK + pid)
    loss = 0.0
    if m != 0:  # a visible patch (mask 0) counts nothing: its pred and image are never loaded
        d, b, l, j, valid = _residual(PRED, IMG, pid, stride_pb, stride_pl, stride_ib, stride_ic, stride_ih,
                                      stride_iw, L, GW, C, PATCH, P, eps, NORM_PIX, BLOCK_P)
        loss = tl.sum(d * d, axis=0) / P * m
    tl.store(LOSS + pid, loss)


@triton.jit
def _mae_bwd(PRED, IMG, MASK, SCALE, DPRED,  # SCALE: (1,) fp32 = grad_output / mask.sum()
             stride_pb, stride_pl, stride_ib, stride_ic, stride_ih, stride_iw, stride_db, stride_dl,
             L, GW, C, PATCH, P, eps, NORM_PIX: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.load(MASK + pid)
    j = tl.arange(0, BLOCK_P)
    if m != 0:
        d, b, l, j, valid = _residual(PRED, IMG, pid, stride_pb, stride_pl, stride_ib, stride_ic, stride_ih,
                                      stride_iw, L, GW, C, PATCH, P, eps, NORM_PIX, BLOCK_P)
        dp = 2.0 * d / P * m * tl.load(SCALE)
    else:  # a visible patch: its gradient is 0, written without loading pred or image
        dp = tl.zeros([BLOCK_P], dtype=tl.float32)
    b = pid // L
    l = pid % L
    tl.store(DPRED + b * stride_db + l * stride_dl + j, dp.to(DPRED.dtype.element_ty), mask=j < P)


def launch_config(p: int) -> Config:
    """BLOCK_P, warps and stages of both kernels for patches of p values (the one place they
    are chosen; bench/gpu_static.py compiles what this returns)."""
    block = triton.next_power_of_2(p)
    return Config({"BLOCK_P": block}, min(max(block // 256, 1), 8), 3)


def _check(pred, imgs, mask, patch_size, kernel=True):
    b, c, h, w = imgs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch_size}")
    length = (h // patch_size) * (w // patch_size)
    p = patch_size * patch_size * c
    if pred.shape != (b, length, p):
        raise ValueError(f"pred must be {(b, length, p)}, got {tuple(pred.shape)}")
    if mask.shape != (b, length):
        raise ValueError(f"mask must be {(b, length)}, got {tuple(mask.shape)}")
    if kernel and p > MAX_P:
        raise ValueError(f"patch of {p} values exceeds the kernel's limit {MAX_P}")
    return length, w // patch_size, c, p


def _masked(mask):
    maskf = mask.reshape(-1).to(torch.float32).contiguous()
    return maskf, maskf.sum()


def _forward(pred, imgs, mask, patch_size, norm_pix, eps):
    """The kernel's forward: the loss as an fp32 scalar."""
    length, gw, c, p = _check(pred, imgs, mask, patch_size)
    if pred.stride(-1) != 1:
        pred = pred.contiguous()
    maskf, total = _masked(mask)
    losses = torch.empty(maskf.numel(), dtype=torch.float32, device=pred.device)
    _mae_fwd[(maskf.numel(),)](pred, imgs, maskf, losses, pred.stride(0), pred.stride(1), *imgs.stride(),
                               length, gw, c, patch_size, p, eps, NORM_PIX=norm_pix, **launch_config(p).kwargs())
    return losses.sum() / total


def _backward(grad, pred, imgs, mask, patch_size, norm_pix, eps):
    """The kernel's backward: d(pred), contiguous, in pred's dtype."""
    length, gw, c, p = _check(pred, imgs, mask, patch_size)
    if pred.stride(-1) != 1:
        pred = pred.contiguous()
    maskf, total = _masked(mask)
    scale = (grad.to(torch.float32) / total).reshape(1)
    dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    _mae_bwd[(maskf.numel(),)](pred, imgs, maskf, scale, dpred, pred.stride(0), pred.stride(1), *imgs.stride(),
                               dpred.stride(0), dpred.stride(1), length, gw, c, patch_size, p, eps,
                               NORM_PIX=norm_pix, **launch_config(p).kwargs())
    return dpred


def _backward_ref(grad, pred, imgs, mask, patch_size, norm_pix, eps):
    """d(mae_loss_ref)/d(pred): 2 (pred - target) / P, masked, over the masked count."""
    mask = mask.to(pred.dtype)
    d = pred - _target(pred, imgs, patch_size, norm_pix, eps)
    return (d * (2.0 / pred.shape[-1]) * mask[..., None] * (grad.to(pred.dtype) / mask.sum())).contiguous()


def _loss_impl(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
               eps: float, kernel: bool) -> torch.Tensor:
    """The masked MAE loss, a scalar: fp32 from the kernel, pred's dtype from the reference."""
    if kernel:
        return _forward(pred, imgs, mask, patch_size, norm_pix, eps)
    with no_autocast(pred.device):
        return mae_loss_ref(pred, imgs, mask, patch_size, norm_pix, eps)


def _loss_bwd_impl(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                   norm_pix: bool, eps: float, kernel: bool) -> torch.Tensor:
    """d(loss)/d(pred), contiguous, in pred's dtype."""
    if kernel:
        return _backward(grad, pred, imgs, mask, patch_size, norm_pix, eps)
    with no_autocast(pred.device):
        return _backward_ref(grad, pred, imgs, mask, patch_size, norm_pix, eps)


def _loss_fake(pred, imgs, mask, patch_size, norm_pix, eps, kernel):
    return pred.new_empty((), dtype=torch.float32 if kernel else pred.dtype)


def _loss_bwd_fake(grad, pred, imgs, mask, patch_size, norm_pix, eps, kernel):
    return pred.new_empty(pred.shape)


mae_loss_backward_op = define("mae_loss_backward", _loss_bwd_impl, _loss_bwd_fake)


def _loss_setup(ctx, inputs, output):
    pred, imgs, mask, *args = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.args = args


def _loss_grad(ctx, grad):
    pred, imgs, mask = ctx.saved_tensors
    return mae_loss_backward_op(grad, pred, imgs, mask, *ctx.args), None, None, None, None, None, None


mae_loss_op = define("mae_loss", _loss_impl, _loss_fake, _loss_grad, _loss_setup)


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = True,
             eps: float = 1e-6, *, kernel: bool = True) -> torch.Tensor:
    """Mean squared error over masked patches, as the op ``cxrfast::mae_loss``; gradient with
    respect to ``pred`` only. ``kernel=False`` runs the same op's torch reference."""
    _check(pred, imgs, mask, patch_size, kernel)
    return mae_loss_op(pred, imgs, mask, int(patch_size), bool(norm_pix), float(eps), kernel)
