"""MAE and classifier models: masking, position embeddings, loss, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrfast import ops
from cxrfast.models import classifier, mae
from cxrfast.models.checkpoints import export_timm, load_pretrained, resample_pos_embed
from cxrfast.models.vit import param_groups, sincos_pos_embed


def tiny_mae(**kw):
    args = dict(img_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    args.update(kw)
    return mae("vit_tiny", **args)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_the_right_patches(ratio):
    m = tiny_mae()
    x = torch.randn(5, 16, 8)
    kept, mask, ids_restore = m.random_masking(x, ratio)
    keep = int(16 * (1 - ratio))
    assert kept.shape == (5, keep, 8)
    assert torch.all(mask.sum(1) == 16 - keep)
    for b in range(5):  # the kept tokens are exactly the unmasked ones, in some order
        visible = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept[b], 0).values, torch.sort(visible, 0).values)
    assert torch.equal(torch.gather(torch.argsort(ids_restore, 1), 1, ids_restore), torch.arange(16).expand(5, 16))
    if 0 < ratio:  # per-sample masks: five samples all drawing the same one has p <= 16^-4
        assert len({tuple(m.tolist()) for m in mask}) > 1


def _mae_reference_pos_embed(dim, gs):
    """MAE's numpy formula (meshgrid, einsum), written out independently."""
    gh = np.arange(gs, dtype=np.float32)
    gw = np.arange(gs, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, gs, gs)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


@pytest.mark.parametrize("dim,gs", [(192, 14), (512, 4), (64, 7)])
def test_sincos_matches_mae_formula(dim, gs):
    np.testing.assert_allclose(sincos_pos_embed(dim, (gs, gs)).numpy(), _mae_reference_pos_embed(dim, gs), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_layout_and_round_trip(channels):
    imgs = torch.randn(2, channels, 32, 48)
    x = ops.patchify(imgs, 16)
    assert x.shape == (2, 6, 16 * 16 * channels)
    # patch (row 1, col 2), pixel (3, 5), channel c sits at index (3 * 16 + 5) * C + c
    for c in range(channels):
        assert x[1, 1 * 3 + 2, (3 * 16 + 5) * channels + c] == imgs[1, c, 16 + 3, 32 + 5]
    assert torch.equal(ops.unpatchify(x, 16, channels, (2, 3)), imgs)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_reference_in_float64(norm_pix):
    imgs = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    pred = torch.randn(3, 4, 256, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    total, count = 0.0, 0
    for b in range(3):
        for r in range(2):
            for c in range(2):
                if mask[b, r * 2 + c]:
                    t = imgs[b, 0, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].reshape(-1)
                    if norm_pix:
                        t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
                    total += float(((pred[b, r * 2 + c] - t) ** 2).mean())
                    count += 1
    assert ops.mae_loss(pred, imgs, mask, 16, norm_pix).item() == pytest.approx(total / count, rel=1e-12)


def _facebook_mae_state_dict(depth=2, dim=192, ddim=64, ddepth=2, gs=4, p=16, chans=3, mlp=4):
    """A state dict with exactly facebookresearch/mae's keys and shapes (RGB patch embedding)."""
    sd = {"cls_token": (1, 1, dim), "pos_embed": (1, gs * gs + 1, dim), "mask_token": (1, 1, ddim),
          "patch_embed.proj.weight": (dim, chans, p, p), "patch_embed.proj.bias": (dim,),
          "norm.weight": (dim,), "norm.bias": (dim,), "decoder_embed.weight": (ddim, dim),
          "decoder_embed.bias": (ddim,), "decoder_pos_embed": (1, gs * gs + 1, ddim),
          "decoder_norm.weight": (ddim,), "decoder_norm.bias": (ddim,),
          "decoder_pred.weight": (p * p * chans, ddim), "decoder_pred.bias": (p * p * chans,)}
    for prefix, n, d in (("blocks", depth, dim), ("decoder_blocks", ddepth, ddim)):
        for i in range(n):
            for name, shape in {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
                                "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
                                "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (mlp * d, d),
                                "mlp.fc1.bias": (mlp * d,), "mlp.fc2.weight": (d, mlp * d), "mlp.fc2.bias": (d,)}.items():
                sd[f"{prefix}.{i}.{name}"] = shape
    return {k: torch.randn(v) for k, v in sd.items()}


IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def test_facebook_mae_checkpoint_loads_without_missing_or_unexpected_keys():
    sd = _facebook_mae_state_dict()
    model = mae("vit_tiny", img_size=64, depth=2, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    result = load_pretrained(model, {"model": sd, "epoch": 799}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # RGB -> grey: the same response to a grey image, ImageNet-normalised for the RGB weights and
    # cxrfast-normalised for ours (the normalisation is folded into the weights and the bias)
    grey = torch.rand(1, 1, 16, 16)
    rgb_in = (grey.expand(1, 3, 16, 16) - IMAGENET_MEAN.view(1, 3, 1, 1)) / IMAGENET_STD.view(1, 3, 1, 1)
    rgb_resp = (sd["patch_embed.proj.weight"] * rgb_in).sum((1, 2, 3)) + sd["patch_embed.proj.bias"]
    ours = (model.patch_embed.proj.weight * (grey - 0.5) / 0.25).sum((1, 2, 3)) + model.patch_embed.proj.bias
    torch.testing.assert_close(ours, rgb_resp, rtol=1e-4, atol=1e-3)
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def test_mae_checkpoint_into_classifier_at_another_resolution():
    sd = _facebook_mae_state_dict()
    model = classifier("vit_tiny", img_size=128, depth=2, num_classes=5)
    result = load_pretrained(model, {"model": sd})
    assert set(result.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert model.pos_embed.shape == (1, 65, 192)
    assert torch.equal(model.pos_embed[:, 0], sd["pos_embed"][:, 0])


def test_resample_identity_and_interpolation():
    pos = sincos_pos_embed(64, (4, 4)).unsqueeze(0)
    assert torch.equal(resample_pos_embed(pos, (4, 4)), pos)
    up = resample_pos_embed(pos, (8, 8))
    assert up.shape == (1, 65, 64)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_then_import_gives_identical_outputs(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    torch.manual_seed(0)
    a = classifier("vit_tiny", img_size=64, depth=2, num_classes=3).eval()
    path = export_timm(a, tmp_path / f"enc{suffix}")
    b = classifier("vit_tiny", img_size=64, depth=2, num_classes=3).eval()
    result = load_pretrained(b, path, strict=True)
    assert not result.missing_keys
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(a(x), b(x))
    keys = set(torch.load(path, weights_only=True) if suffix == ".pth" else __import__("safetensors.torch").torch.load_file(str(path)))
    assert "blocks.0.attn.qkv.weight" in keys and "fc_norm.weight" in keys and "head.weight" in keys


def test_param_groups_decay_rules():
    model = classifier("vit_tiny", img_size=64, depth=3, num_classes=2)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["blocks.0.attn.qkv.bias"])]["weight_decay"] == 0
    assert by_param[id(named["blocks.0.norm1.weight"])]["weight_decay"] == 0
    assert by_param[id(named["cls_token"])]["weight_decay"] == 0
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["blocks.2.mlp.fc1.weight"])]["lr_scale"] == pytest.approx(0.75)
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(0.75 ** 4)


def test_loss_decreases_on_a_tiny_dataset():
    torch.manual_seed(0)
    model = tiny_mae(depth=2)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    phase = torch.rand(8, 1, 1, 1) * 6
    imgs = torch.sin(6 * xx + phase) * torch.cos(4 * yy) + 0.05 * torch.randn(8, 1, 64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    noise = torch.rand(8, 16)
    first = None
    for _ in range(40):
        loss, _, _ = model(imgs, noise=noise)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
