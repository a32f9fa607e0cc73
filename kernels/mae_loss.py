"""Fused MAE loss: patchify the target, normalise each patch (norm_pix), squared error against
the prediction, mean over masked patches — without writing the patchified target anywhere.

Layout as facebookresearch/mae, for any channel count C: imgs (B, C, H, W); pred (B, L, p*p*C)
with patches row-major and (row, column, channel) order inside a patch; mask (B, L) with
1 = masked. norm_pix uses each patch's own mean and unbiased variance:
(t - mean) / sqrt(var + eps).

One program per patch: it gathers the patch from the image by index arithmetic, forms the
target in registers, and writes one fp32 number (its masked loss). The backward recomputes
the target the same way and writes d(pred). Design limit: p*p*C <= 16384.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Config


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
    d, b, l, j, valid = _residual(PRED, IMG, pid, stride_pb, stride_pl, stride_ib, stride_ic, stride_ih, stride_iw,
                                  L, GW, C, PATCH, P, eps, NORM_PIX, BLOCK_P)
    tl.store(LOSS + pid, tl.sum(d * d, axis=0) / P * tl.load(MASK + pid))


@triton.jit
def _mae_bwd(PRED, IMG, MASK, SCALE, DPRED,  # SCALE: (1,) fp32 = grad_output / mask.sum()
             stride_pb, stride_pl, stride_ib, stride_ic, stride_ih, stride_iw, stride_db, stride_dl,
             L, GW, C, PATCH, P, eps, NORM_PIX: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    d, b, l, j, valid = _residual(PRED, IMG, pid, stride_pb, stride_pl, stride_ib, stride_ic, stride_ih, stride_iw,
                                  L, GW, C, PATCH, P, eps, NORM_PIX, BLOCK_P)
    dp = 2.0 * d / P * tl.load(MASK + pid) * tl.load(SCALE)
    tl.store(DPRED + b * stride_db + l * stride_dl + j, dp.to(DPRED.dtype.element_ty), mask=valid)


def launch_config(p: int) -> Config:
    """BLOCK_P, warps and stages of both kernels for patches of p values (the one place they
    are chosen; bench/gpu_static.py compiles what this returns)."""
    block = triton.next_power_of_2(p)
    return Config({"BLOCK_P": block}, min(max(block // 256, 1), 8), 3)


def _check(pred, imgs, mask, patch_size):
    b, c, h, w = imgs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch_size}")
    length = (h // patch_size) * (w // patch_size)
    p = patch_size * patch_size * c
    if pred.shape != (b, length, p):
        raise ValueError(f"pred must be {(b, length, p)}, got {tuple(pred.shape)}")
    if mask.shape != (b, length):
        raise ValueError(f"mask must be {(b, length)}, got {tuple(mask.shape)}")
    if p > 16384:
        raise ValueError(f"patch of {p} values exceeds the kernel's limit 16384")
    return length, w // patch_size, c, p


class MAELossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, imgs, mask, patch_size, norm_pix, eps):
        length, gw, c, p = _check(pred, imgs, mask, patch_size)
        if pred.stride(-1) != 1:
            pred = pred.contiguous()
        maskf = mask.reshape(-1).to(torch.float32).contiguous()
        losses = torch.empty(maskf.numel(), dtype=torch.float32, device=pred.device)
        _mae_fwd[(maskf.numel(),)](pred, imgs, maskf, losses, pred.stride(0), pred.stride(1), *imgs.stride(),
                                   length, gw, c, patch_size, p, eps, NORM_PIX=norm_pix,
                                   **launch_config(p).kwargs())
        total = maskf.sum()
        ctx.save_for_backward(pred, imgs, maskf, total)
        ctx.args = (length, gw, c, patch_size, p, eps, norm_pix)
        return losses.sum() / total

    @staticmethod
    def backward(ctx, grad):
        pred, imgs, maskf, total = ctx.saved_tensors
        length, gw, c, patch, p, eps, norm_pix = ctx.args
        scale = (grad.to(torch.float32) / total).reshape(1)
        dpred = torch.empty_like(pred)
        _mae_bwd[(maskf.numel(),)](pred, imgs, maskf, scale, dpred, pred.stride(0), pred.stride(1), *imgs.stride(),
                                   dpred.stride(0), dpred.stride(1), length, gw, c, patch, p, eps,
                                   NORM_PIX=norm_pix, **launch_config(p).kwargs())
        return dpred, None, None, None, None, None


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over masked patches; gradient with respect to ``pred`` only."""
    return MAELossFn.apply(pred, imgs, mask, patch_size, norm_pix, eps)


def mae_loss_ref(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6):
    """Plain torch reference: patchify, normalise, MSE, masked mean (facebookresearch/mae);
    the same function cxrfast.ops runs when the kernel is not used."""
    from cxrfast.ops import mae_loss_torch

    return mae_loss_torch(pred, imgs, mask, patch_size, norm_pix, eps)
