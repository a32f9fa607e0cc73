"""The MAE masking path that moves only visible tokens (cxrfast/models/mae.py,
kernels/masking.py) against facebookresearch/mae's conv + gather + cat path it replaced."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cxrfast import ops
from cxrfast.models import mae
from cxrfast.models.mae import visible_count
from kernels.masking import mask_ids, unshuffle, unshuffle_op, unshuffle_ref


@pytest.fixture
def poison(monkeypatch):
    """Buffers allocated with torch.empty start as NaN: a row the op forgets to write shows."""
    empty = torch.empty

    def nan_empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def _tiny(in_chans=1, norm_pix=True, dtype=torch.float64):
    torch.manual_seed(0)
    return mae("vit_tiny", img_size=32, patch_size=8, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2,
               decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix).to(dtype)


def _old_forward(m, imgs, noise):
    """Today's path before this change: conv over every patch + pos, gather the kept tokens;
    decoder input by cat + gather over all L (facebookresearch/mae's models_mae.py)."""
    x = m.patch_embed(imgs) + m.pos_embed[:, 1:, :]
    b, length, d = x.shape
    keep = int(length * (1 - m.mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1, :]).expand(b, -1, -1), x], dim=1)
    for blk in m.blocks:
        x = blk(x)
    y = m.decoder_embed(m.norm(x))
    masked = m.mask_token.expand(b, length + 1 - y.shape[1], -1)
    patches = torch.cat([y[:, 1:, :], masked], dim=1)
    patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, y.shape[2]))
    y = torch.cat([y[:, :1, :], patches], dim=1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        y = blk(y)
    pred = m.decoder_pred(m.decoder_norm(y))[:, 1:, :]
    return ops.mae_loss(pred, imgs, mask, m.patch_embed.patch_size, m.norm_pix_loss), pred, mask


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_new_path_equals_old_path(in_chans, norm_pix):
    """Same noise, same parameters: the same mask, predictions, loss and every gradient (fp64)."""
    m = _tiny(in_chans, norm_pix)
    imgs = torch.randn(3, in_chans, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 16)
    loss, pred, mask = m(imgs, noise=noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    old_loss, old_pred, old_mask = _old_forward(m, imgs, noise)
    old_loss.backward()
    assert torch.equal(mask, old_mask) and mask.dtype == old_mask.dtype
    torch.testing.assert_close(pred, old_pred, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loss, old_loss, atol=1e-12, rtol=1e-10)
    old_grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads.keys() == old_grads.keys() and "patch_embed.proj.weight" in grads and "mask_token" in grads
    for n, g in grads.items():
        torch.testing.assert_close(g, old_grads[n], atol=1e-12, rtol=1e-9, msg=n)


def test_embed_patches_equals_the_conv_on_expanded_and_fp32_images():
    """fp32, 3 channels expanded from one (stride 0, as the DALI loader hands them over)."""
    m = _tiny(3, dtype=torch.float32)
    imgs = torch.randn(2, 1, 32, 32).expand(-1, 3, -1, -1)
    ids = torch.tensor([[5, 0, 15], [3, 9, 2]])
    full = m.patch_embed(imgs)
    out = m.patch_embed.embed_patches(imgs, ids)
    torch.testing.assert_close(out, torch.gather(full, 1, ids[..., None].expand(-1, -1, full.shape[-1])),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected 32x32"):
        m.patch_embed.embed_patches(torch.randn(1, 3, 16, 16), ids[:1])


def _inputs(b=3, length=10, keep=4, d=6, x_dtype=torch.float64, dtype=torch.float64):
    ids_keep, mask, ids_restore = mask_ids(torch.rand(b, length), keep)
    x = torch.randn(b, 1 + keep, d, dtype=x_dtype, requires_grad=True)
    token = torch.randn(1, 1, d, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, 1 + length, d, dtype=dtype, requires_grad=True)
    return x, token, pos, ids_keep, ids_restore, mask


@pytest.mark.parametrize("keep", [0, 1, 4, 10])
def test_unshuffle_op_against_the_cat_gather_reference(poison, keep):
    x, token, pos, ids_keep, ids_restore, mask = _inputs(keep=keep)
    out = unshuffle(x, token, pos, ids_keep, ids_restore)
    ref = unshuffle_ref(x, token, pos, ids_keep, ids_restore)
    assert torch.equal(out, ref)
    assert torch.equal(out[:, 1:][mask.bool()], (token + pos[:, 1:]).expand_as(out[:, 1:])[mask.bool()])
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, token, pos), go)
    ref_grads = torch.autograd.grad(ref, (x, token, pos), go)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def test_unshuffle_keeps_the_dtypes_autocast_gives_it():
    """bf16 tokens with fp32 parameters: an fp32 output (the promotion cat gave), each
    gradient in its input's dtype."""
    x, token, pos, ids_keep, ids_restore, _ = _inputs(x_dtype=torch.bfloat16, dtype=torch.float32)
    pos.requires_grad_(False)
    out = unshuffle(x, token, pos, ids_keep, ids_restore)
    ref = unshuffle_ref(x, token, pos, ids_keep, ids_restore)
    assert out.dtype == ref.dtype == torch.float32 and torch.equal(out, ref)
    go = torch.randn_like(out)
    dx, dt = torch.autograd.grad(out, (x, token), go)
    rx, rt = torch.autograd.grad(ref, (x, token), go)
    assert dx.dtype == torch.bfloat16 and dt.dtype == torch.float32
    assert torch.equal(dx, rx)
    torch.testing.assert_close(dt, rt, atol=1e-5, rtol=1e-5)


def test_unshuffle_opcheck():
    x, token, pos, ids_keep, ids_restore, _ = _inputs(dtype=torch.float32, x_dtype=torch.float32)
    pos.requires_grad_(False)
    torch.library.opcheck(unshuffle_op, (x, token, pos, ids_keep, ids_restore))


def test_unshuffle_rejects_ids_that_do_not_fit():
    x, token, pos, ids_keep, ids_restore, _ = _inputs()
    with pytest.raises(ValueError, match="do not fit"):
        unshuffle(x, token, pos, ids_keep[:, :-1], ids_restore)
    with pytest.raises(ValueError, match="do not fit"):
        unshuffle(x, token, pos[:, :-1], ids_keep, ids_restore)


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.seen.append((func.name(), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_backward_has_no_scatter_and_no_sequence_sized_zeros(backend):
    """The MAE step's backward: no scatter / scatter_add / index_put and no zeros of a
    (B, L, D) or (B, 1 + L, D) sequence (fails on the conv + gather + cat path)."""
    ops.set_backend(backend)
    try:
        m = _tiny(dtype=torch.float32)
        b, length = 2, m.patch_embed.num_patches
        loss = m(torch.randn(b, 1, 32, 32), noise=torch.rand(b, length))[0]
        rec = _Record()
        with rec:
            loss.backward()
    finally:
        ops.set_backend("auto")
    names = [n for n, _ in rec.seen]
    assert names and not [n for n in names if "scatter" in n or "index_put" in n or "index_add" in n], names
    sequence = {(b, n, d) for n in (length, length + 1) for d in (m.embed_dim, m.mask_token.shape[-1])}
    zeros = [(n, s) for n, shapes in rec.seen if "zero" in n or "fill" in n for s in shapes if s in sequence]
    assert not zeros, zeros
    assert m.mask_token.grad is not None and m.patch_embed.proj.weight.grad is not None


def test_forward_decoder_without_ids_keep_recovers_them():
    """facebookresearch/mae's call forward_decoder(latent, ids_restore) still works."""
    m = _tiny()
    imgs = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    ids_keep, _, ids_restore = m.masking(2, 0.75, torch.rand(2, 16))
    latent = m.encode_visible(imgs, ids_keep)
    assert torch.equal(m.forward_decoder(latent, ids_restore), m.forward_decoder(latent, ids_restore, ids_keep))


def test_visible_count_rounds_down_as_mae_does():
    """int(), not round(): 19 of 196 patches stay at 0.9 (round would give 20); a product that
    is whole in exact arithmetic is not lost to floating point (400 * (1 - 0.9) = 39.999...)."""
    assert visible_count(196, 0.75) == 49 and visible_count(196, 0.9) == 19 and visible_count(400, 0.9) == 40
    m = _tiny()
    _, mask, _ = m.masking(2, 0.9, torch.rand(2, 16))
    assert mask.sum(1).tolist() == [15, 15]  # int(1.6) = 1 visible of 16


def test_the_same_ids_keep_gives_the_same_loss_in_any_order():
    m = _tiny()
    imgs = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    ids = torch.tensor([[3, 0, 15, 7], [9, 2, 4, 1]])
    loss = m(imgs, ids_keep=ids)[0]
    assert torch.equal(m(imgs, ids_keep=ids.clone())[0], loss)
    torch.testing.assert_close(m(imgs, ids_keep=ids.flip(1))[0], loss, atol=1e-12, rtol=1e-10)
    noise = torch.rand(2, 16)  # the patches noise keeps, given as ids_keep: the noise path's numbers
    from_noise, _, _ = m.masking(2, m.mask_ratio, noise)
    torch.testing.assert_close(m(imgs, ids_keep=from_noise)[0], m(imgs, noise=noise)[0], atol=1e-12, rtol=1e-10)
    assert not torch.allclose(m(imgs, ids_keep=torch.tensor([[1, 2, 5, 6], [0, 8, 10, 11]]))[0], loss)


def test_mask_from_ids_keep_marks_exactly_the_other_patches():
    m = _tiny()
    ids = torch.tensor([[3, 0, 15, 7, 8], [9, 2, 4, 1, 11]])
    ids_keep, mask, ids_restore = m.masking_from_ids(ids, 2)
    assert torch.equal(ids_keep, ids)
    for row in range(2):
        expected = torch.ones(16)
        expected[ids[row]] = 0
        assert torch.equal(mask[row], expected)
        assert ids_restore[row][ids[row]].tolist() == list(range(5))  # encoder token j is patch ids[row, j]
    _, _, mask = m(torch.randn(2, 1, 32, 32, dtype=torch.float64), ids_keep=ids)
    assert mask.sum(1).tolist() == [11, 11]


@pytest.mark.parametrize("noise, message", [
    (torch.rand(2, 17), r"noise must have shape \(batch, patches\) = \(2, 16\), got \(2, 17\)"),
    (torch.rand(3, 16), r"= \(2, 16\), got \(3, 16\)"),
    (torch.rand(2, 4, 4), r"got \(2, 4, 4\)"),
    (torch.randint(0, 9, (2, 16)), "floating-point tensor, got torch.int64"),
])
def test_bad_noise_is_a_value_error_naming_the_shapes(noise, message):
    m = _tiny()
    with pytest.raises(ValueError, match=message):
        m(torch.randn(2, 1, 32, 32, dtype=torch.float64), noise=noise)
    with pytest.raises(ValueError, match=message):
        m.random_masking(torch.randn(2, 16, 32), 0.75, noise)


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 2, 2, 3], [0, 1, 2, 3]]), r"row 0 must hold distinct patch indices in \[0, 16\), got \[1, 2, 2, 3\]"),
    (torch.tensor([[1, 2, 3, 4], [0, 1, 2, 16]]), r"row 1 must hold distinct"),
    (torch.tensor([[-1, 2, 3, 4], [0, 1, 2, 3]]), r"row 0 must hold distinct"),
    (torch.tensor([[1, 2, 3, 4]]), r"ids_keep must have shape \(batch, keep\) = \(2, keep <= 16\), got \(1, 4\)"),
    (torch.arange(17).expand(2, -1), r"got \(2, 17\)"),
    (torch.tensor([1, 2, 3, 4]), r"got \(4,\)"),
    (torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]], dtype=torch.int32), "int64 patch indices, got torch.int32"),
])
def test_bad_ids_keep_is_a_value_error(ids, message):
    m = _tiny()
    with pytest.raises(ValueError, match=message):
        m(torch.randn(2, 1, 32, 32, dtype=torch.float64), ids_keep=ids)


def test_ids_keep_excludes_noise_and_an_other_mask_ratio():
    m = _tiny()
    imgs, ids = torch.randn(2, 1, 32, 32, dtype=torch.float64), torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    with pytest.raises(ValueError, match="noise or ids_keep, not both"):
        m(imgs, noise=torch.rand(2, 16), ids_keep=ids)
    with pytest.raises(ValueError, match="mask_ratio 0.5 keeps 8 of 16 patches, ids_keep gives 4"):
        m(imgs, mask_ratio=0.5, ids_keep=ids)
    assert torch.equal(m(imgs, mask_ratio=0.75, ids_keep=ids)[0], m(imgs, ids_keep=ids)[0])
