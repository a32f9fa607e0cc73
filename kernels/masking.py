"""MAE decoder unshuffle as the op ``cxrfast::mae_unshuffle``: visible tokens back at their
positions, the mask token everywhere else, position embeddings added, in one write of the
(B, 1 + L, D) decoder input; its backward reads back only what each input needs.

Why an op: autograd of the plain-torch unshuffle (``cat`` + ``gather``, facebookresearch/mae)
allocates a full-size zero gradient and ``scatter_add``s into it, twice over the (B, 1 + L, D)
sequence. Here the forward builds a small table, the visible tokens (plus their position rows,
B * (1 + keep) rows) and the mask token plus each position row (1 + L rows, shared by the
batch), and one ``index_select`` writes each output token once. The backward gathers
d(visible) from the gradient rows at the visible positions and gets d(mask_token) as one GEMV
(masked-position indicator times the gradient); no zeros, no scatter.

Plain torch inside (no Triton, so it runs wherever torch does; no ``kernel`` flag). Layout:
x (B, 1 + keep, D) with CLS first; mask_token (1, 1, D); pos (1, 1 + L, D); ids_keep
(B, keep) and ids_restore (B, L) int64 from :func:`mask_ids`. Output dtype: the promotion of
x, mask_token and pos (bf16 tokens with fp32 parameters give fp32, as ``cat`` did).
"""
from __future__ import annotations

from typing import Tuple

import torch

from kernels.library import define


def mask_ids(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep (B, keep), mask (B, L) float 1 = removed, ids_restore (B, L)) from noise
    (B, L): the ``keep`` lowest-noise patches stay (facebookresearch/mae's random_masking)."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= keep).to(torch.get_default_dtype())  # torch.ones' dtype, as mae's
    return ids_shuffle[:, :keep], mask, ids_restore


def _token_positions(ids_keep: torch.Tensor) -> torch.Tensor:
    """(B, 1 + keep): the sequence position of each encoder token (CLS at 0)."""
    return torch.cat([ids_keep.new_zeros(ids_keep.shape[0], 1), ids_keep + 1], dim=1)


def _table_rows(ids_restore: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, 1 + L): the table row each decoder token copies: its own visible token (batch b's
    rows b * (1 + keep) ...) or, when masked, the shared mask-token row of its position."""
    b, length = ids_restore.shape
    first = torch.arange(b, device=ids_restore.device)[:, None] * (1 + keep)
    shared = b * (1 + keep) + 1 + torch.arange(length, device=ids_restore.device)
    rows = torch.where(ids_restore < keep, first + 1 + ids_restore, shared)
    return torch.cat([first, rows], dim=1)


def _out_dtype(x, mask_token, pos) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos.dtype)


def _unshuffle_impl(x: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor,
                    ids_restore: torch.Tensor) -> torch.Tensor:
    """(B, 1 + L, D) decoder input; each output token written once."""
    b, n, d = x.shape
    length = ids_restore.shape[1]
    table = torch.empty(b * n + 1 + length, d, dtype=_out_dtype(x, mask_token, pos), device=x.device)
    torch.add(x, pos[0][_token_positions(ids_keep)], out=table[:b * n].view(b, n, d))
    torch.add(mask_token.reshape(1, d), pos[0], out=table[b * n:])
    return torch.index_select(table, 0, _table_rows(ids_restore, n - 1).reshape(-1)).view(b, 1 + length, d)


def _unshuffle_fake(x, mask_token, pos, ids_keep, ids_restore):
    return x.new_empty((x.shape[0], 1 + ids_restore.shape[1], x.shape[2]), dtype=_out_dtype(x, mask_token, pos))


def _unshuffle_bwd_impl(grad: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                        x_dtype: torch.dtype, token_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d(x) (B, 1 + keep, D), d(mask_token) (1, 1, D)) from the (B, 1 + L, D) gradient."""
    b, seq, d = grad.shape
    keep = ids_keep.shape[1]
    g = grad.reshape(b * seq, d)
    rows = torch.arange(b, device=grad.device)[:, None] * seq + _token_positions(ids_keep)
    dx = torch.index_select(g, 0, rows.reshape(-1)).view(b, 1 + keep, d).to(x_dtype)
    masked = torch.cat([ids_restore.new_zeros(b, 1), ids_restore >= keep], dim=1).to(grad.dtype)
    dtoken = torch.mm(masked.view(1, b * seq), g).view(1, 1, d).to(token_dtype)
    return dx, dtoken


def _unshuffle_bwd_fake(grad, ids_keep, ids_restore, x_dtype, token_dtype):
    b, _, d = grad.shape
    return (grad.new_empty((b, 1 + ids_keep.shape[1], d), dtype=x_dtype),
            grad.new_empty((1, 1, d), dtype=token_dtype))


unshuffle_backward_op = define("mae_unshuffle_backward", _unshuffle_bwd_impl, _unshuffle_bwd_fake)


def _unshuffle_setup(ctx, inputs, output):
    x, mask_token, pos, ids_keep, ids_restore = inputs
    ctx.save_for_backward(ids_keep, ids_restore)
    ctx.dtypes = (x.dtype, mask_token.dtype, pos.dtype)


def _unshuffle_grad(ctx, grad):
    ids_keep, ids_restore = ctx.saved_tensors
    x_dtype, token_dtype, pos_dtype = ctx.dtypes
    dx, dtoken = unshuffle_backward_op(grad, ids_keep, ids_restore, x_dtype, token_dtype)
    # MAE's decoder position embedding is fixed; a trainable one gets the batch sum
    dpos = grad.sum(0, keepdim=True).to(pos_dtype) if ctx.needs_input_grad[2] else None
    return dx, dtoken, dpos, None, None


unshuffle_op = define("mae_unshuffle", _unshuffle_impl, _unshuffle_fake, _unshuffle_grad, _unshuffle_setup)


def unshuffle_ref(x: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor,
                  ids_restore: torch.Tensor) -> torch.Tensor:
    """Plain differentiable torch (facebookresearch/mae's cat + gather): the op's twin; its
    autograd backward is a full-size zeros + scatter_add."""
    b, n, d = x.shape
    masked = mask_token.expand(b, ids_restore.shape[1] + 1 - n, -1)
    patches = torch.cat([x[:, 1:, :], masked], dim=1)
    patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    return torch.cat([x[:, :1, :], patches], dim=1) + pos


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor,
              ids_restore: torch.Tensor) -> torch.Tensor:
    """The MAE decoder input (B, 1 + L, D): x (B, 1 + keep, D, CLS first) at positions
    [0, 1 + ids_keep], mask_token (1, 1, D) at the others, plus pos (1, 1 + L, D)."""
    b, n, d = x.shape
    if ids_keep.shape != (b, n - 1) or ids_restore.shape[0] != b or ids_restore.shape[1] < n - 1:
        raise ValueError(f"ids_keep {tuple(ids_keep.shape)} / ids_restore {tuple(ids_restore.shape)} "
                         f"do not fit tokens {tuple(x.shape)}")
    if mask_token.shape != (1, 1, d) or pos.shape != (1, 1 + ids_restore.shape[1], d):
        raise ValueError(f"mask_token {tuple(mask_token.shape)} / pos {tuple(pos.shape)} do not fit width {d}")
    return unshuffle_op(x, mask_token, pos, ids_keep, ids_restore)
