"""RGB checkpoints into the grey model with the input normalisation folded in
(cxrfast/models/checkpoints.py): the grey model on a grey image computes what the RGB model
computes on that image replicated to R=G=B and normalised with ImageNet's statistics."""
from __future__ import annotations

import pytest
import torch

from cxrfast.data import augment
from cxrfast.models import classifier, mae
from cxrfast.models.checkpoints import (CXR_GREY, IMAGENET, CheckpointError, Normalisation, adapt_patch_embed,
                                        filter_for, load_file, load_pretrained, slim, source_normalisation)

IMG, PATCH = 32, 8


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 with every parameter random (biases and tokens too: zeros would hide a missed shift)."""
    torch.manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 0.5)
    return model


def _mae(in_chans: int, norm_pix: bool = False, seed: int = 0):
    return _randomised(mae("vit_tiny", img_size=IMG, patch_size=PATCH, in_chans=in_chans, embed_dim=32, depth=2,
                           num_heads=2, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2,
                           norm_pix_loss=norm_pix), seed)


def _classifier(in_chans: int, seed: int = 0):
    return _randomised(classifier("vit_tiny", img_size=IMG, patch_size=PATCH, in_chans=in_chans, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=3, drop_path_rate=0.0), seed).eval()


def _normalised(grey: torch.Tensor, norm: Normalisation, channels: int) -> torch.Tensor:
    """A [0, 1] grey image (B, 1, H, W) replicated to ``channels`` and normalised per channel."""
    mean, std = norm.per_channel(channels)
    return (grey.expand(-1, channels, -1, -1) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _grey_images(b: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(b, 1, IMG, IMG, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _all_tokens(model, imgs: torch.Tensor) -> torch.Tensor:
    """The MAE encoder's full output (B, 1 + L, D) with every patch visible."""
    ids = torch.arange(model.patch_embed.num_patches).expand(imgs.shape[0], -1)
    return model.encode_visible(imgs, ids)


def test_grey_normalisation_is_the_loaders():
    """The model side cannot import the loaders: the two constants must agree."""
    assert CXR_GREY == Normalisation((augment.MEAN,), (augment.STD,))


def test_imagenet_mae_folds_into_the_grey_mae_patch_tokens_and_encoder():
    rgb, grey = _mae(3), _mae(1, seed=5)
    report = load_pretrained(grey, {"model": rgb.state_dict()}, strict=True)  # no config: ImageNet by default
    assert "ImageNet" in report.describe() and "folded" in report.describe()
    g = _grey_images()
    x_rgb, x_grey = _normalised(g, IMAGENET, 3), _normalised(g, CXR_GREY, 1)
    with torch.no_grad():
        assert _rel(grey.patch_embed(x_grey), rgb.patch_embed(x_rgb)) < 1e-5
        assert _rel(_all_tokens(grey, x_grey), _all_tokens(rgb, x_rgb)) < 1e-5
        # what the fold fixes: channels summed without it give other tokens
        summed = adapt_patch_embed(rgb.patch_embed.proj.weight, 1)
        plain = torch.nn.functional.conv2d(x_grey, summed, rgb.patch_embed.proj.bias, stride=PATCH)
        assert _rel(plain.flatten(2).transpose(1, 2), rgb.patch_embed(x_rgb)) > 1e-2


def test_imagenet_classifier_folds_into_the_grey_classifier():
    rgb, grey = _classifier(3), _classifier(1, seed=5)
    load_pretrained(grey, {"model": rgb.state_dict()}, strict=True)
    g = _grey_images()
    with torch.no_grad():
        assert _rel(grey.forward_features(_normalised(g, CXR_GREY, 1)),
                    rgb.forward_features(_normalised(g, IMAGENET, 3))) < 1e-5
        assert _rel(grey(_normalised(g, CXR_GREY, 1)), rgb(_normalised(g, IMAGENET, 3))) < 1e-5


def test_imagenet_into_a_three_channel_model_is_renormalised_too():
    """Same channel count, other normalisation: the shapes fit, the values still need the fold."""
    rgb, ours = _mae(3), _mae(3, seed=5)
    load_pretrained(ours, {"model": rgb.state_dict()}, strict=True)
    g = _grey_images()
    with torch.no_grad():
        assert _rel(_all_tokens(ours, _normalised(g, CXR_GREY, 3)), _all_tokens(rgb, _normalised(g, IMAGENET, 3))) < 1e-5


def test_grey_cxrfast_checkpoint_into_three_channels_keeps_its_tokens():
    grey, ours = _mae(1), _mae(3, seed=5)
    report = load_pretrained(ours, {"model": grey.state_dict(), "config": {"model": "vit_tiny"}}, strict=True)
    assert "folded" not in report.describe()
    g = _grey_images()
    with torch.no_grad():
        assert _rel(_all_tokens(ours, _normalised(g, CXR_GREY, 3)), _all_tokens(grey, _normalised(g, CXR_GREY, 1))) < 1e-12


def test_pixel_decoder_head_predicts_the_rgb_heads_pixels():
    """norm_pix_loss False: the grey head's prediction, taken back to [0, 1] pixels, is the mean
    of the RGB head's three channel predictions taken back to pixels."""
    rgb, grey = _mae(3, norm_pix=False), _mae(1, norm_pix=False, seed=5)
    load_pretrained(grey, {"model": rgb.state_dict()}, strict=True)
    g = _grey_images()
    noise = torch.rand(g.shape[0], rgb.patch_embed.num_patches)
    with torch.no_grad():
        pred_rgb = rgb(_normalised(g, IMAGENET, 3), noise=noise)[1]
        pred_grey = grey(_normalised(g, CXR_GREY, 1), noise=noise)[1]
    mean, std = IMAGENET.per_channel(3)
    pixels = (pred_rgb.unflatten(-1, (-1, 3)) * std + mean).mean(-1)
    assert _rel(pred_grey * CXR_GREY.std[0] + CXR_GREY.mean[0], pixels) < 1e-5


def test_normalised_patch_head_averages_the_channels():
    """norm_pix_loss True: no pixel fold (the target is per-patch normalised), channel mean."""
    rgb, grey = _mae(3, norm_pix=True), _mae(1, norm_pix=True, seed=5)
    load_pretrained(grey, {"model": rgb.state_dict()}, strict=True)
    g = _grey_images()
    noise = torch.rand(g.shape[0], rgb.patch_embed.num_patches)
    with torch.no_grad():
        pred_rgb = rgb(_normalised(g, IMAGENET, 3), noise=noise)[1]
        pred_grey = grey(_normalised(g, CXR_GREY, 1), noise=noise)[1]
    assert _rel(pred_grey, pred_rgb.unflatten(-1, (-1, 3)).mean(-1)) < 1e-5


def test_where_the_source_normalisation_comes_from(tmp_path):
    sd = _mae(3).state_dict()
    assert source_normalisation({"model": sd}) is None  # filter_for: ImageNet for 3 channels
    assert source_normalisation({"model": sd, "config": {"in_chans": 3}}) == CXR_GREY
    given = {"model": sd, "normalisation": {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.2, 0.25]}, "config": {}}
    assert source_normalisation(given) == Normalisation((0.4, 0.4, 0.4), (0.3, 0.2, 0.25))
    assert slim(given)["normalisation"] == {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.2, 0.25]}
    assert set(slim({"model": sd})) == {"model"}
    # a cxrfast 3-channel checkpoint is not renormalised: its tensors load as they are
    ours = _mae(3, seed=5)
    load_pretrained(ours, {"model": sd, "config": {"in_chans": 3}})
    assert torch.equal(ours.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(ours.decoder_pred.bias, sd["decoder_pred.bias"])
    # an explicit source_norm wins over the default
    load_pretrained(ours, {"model": sd}, source_norm=CXR_GREY)
    assert torch.equal(ours.patch_embed.proj.bias, sd["patch_embed.proj.bias"])
    folded = filter_for(_mae(1), sd).state_dict
    assert not torch.equal(folded["patch_embed.proj.bias"], sd["patch_embed.proj.bias"])
    path = tmp_path / "bad_norm.pth"
    torch.save({"model": sd, "normalisation": {"mean": [0.5], "std": [0.0]}}, path)
    with pytest.raises(CheckpointError, match=r"bad_norm.pth: its 'normalisation' entry .*positive"):
        load_pretrained(ours, path)
    with pytest.raises(CheckpointError, match=r"x.pth: its 'normalisation' entry"):
        slim(load_file(path), "x.pth")


def test_normalisation_rejects_what_cannot_be_a_normalisation():
    with pytest.raises(ValueError, match="as many means as stds"):
        Normalisation((0.5, 0.5), (0.25,))
    with pytest.raises(ValueError, match="does not fit 3 channels"):
        Normalisation((0.5, 0.5), (0.25, 0.25)).per_channel(3)
