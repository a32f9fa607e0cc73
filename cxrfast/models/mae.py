"""The MAE ViT (He et al. 2022) for single-channel chest radiographs.

Parameter names follow facebookresearch/mae (``models_mae.py``), so its checkpoints and
RETFound's load one to one. The encoder runs on the visible patches only (only their pixels
are read and embedded); a light decoder reconstructs every patch from an input built in one
write (``cxrfast::mae_unshuffle``); the loss counts masked patches only.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.masking import mask_ids

from .. import ops
from .vit import Block, LayerNorm, ViTEncoder, init_weights, preset, run_blocks, sincos_pos_embed


class MaskedAutoencoderViT(ViTEncoder):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 mask_ratio: float = 0.75):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.norm = LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        num_patches = self.patch_embed.num_patches
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.apply(init_weights)
        self.init_encoder()
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(decoder_embed_dim, self.patch_embed.grid).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)

    def masking(self, b: int, mask_ratio: float, noise: torch.Tensor | None = None,
                device: torch.device | None = None):
        """(ids_keep (B, keep), mask (B, L; 1 = removed), ids_restore (B, L)): a random subset
        of :func:`visible_count` patches per sample stays; ``noise`` (B, L) float on ``device``
        makes the choice reproducible (the lowest-noise patches stay). Raises ValueError for a
        noise of another shape, dtype or device."""
        length = self.patch_embed.num_patches
        if noise is None:
            noise = torch.rand(b, length, device=device)
        else:
            check_noise(noise, b, length, device)
        return mask_ids(noise, visible_count(length, mask_ratio))

    def masking_from_ids(self, ids_keep: torch.Tensor, b: int, device: torch.device | None = None):
        """(ids_keep, mask (B, L; 1 = removed), ids_restore (B, L)) for chosen visible patches
        ``ids_keep`` (B, keep) int64: the mask marks exactly the other patches; encoder tokens
        follow ids_keep's order. Raises ValueError unless each row holds distinct patch
        indices in [0, L) (checking reads the ids back to the host: one sync)."""
        length = self.patch_embed.num_patches
        check_ids_keep(ids_keep, b, length, device)
        keep = ids_keep.shape[1]
        # sort keys: the kept patches first, in ids_keep's order, then the others in index order
        order = torch.arange(keep, length + keep, device=ids_keep.device).expand(b, -1).clone()
        order.scatter_(1, ids_keep, torch.arange(keep, device=ids_keep.device).expand(b, -1))
        return mask_ids(order, keep)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keeps a random subset of :func:`visible_count` tokens of x (B, L, D) per sample
        (facebookresearch/mae's interface): (kept (B, keep, D), mask (B, L), ids_restore)."""
        b, length, d = x.shape
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        else:
            check_noise(noise, b, length, x.device)
        ids_keep, mask, ids_restore = mask_ids(noise, visible_count(length, mask_ratio))
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d)), mask, ids_restore

    def encode_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, 1 + keep, D) latent of the visible patches: only their pixels are embedded
        (PatchEmbed.embed_patches) and only their position rows gathered."""
        x = self.patch_embed.embed_patches(imgs, ids_keep) + self.pos_embed[0, 1:][ids_keep]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        latent, _ = run_blocks(self.blocks, x, self.norm)
        return latent

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """(latent (B, 1 + keep, D), mask (B, L), ids_restore (B, L))."""
        ids_keep, mask, ids_restore = self.masking(imgs.shape[0], mask_ratio, noise, imgs.device)
        return self.encode_visible(imgs, ids_keep), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, p*p*C) predictions; ``ids_keep`` (from :meth:`masking`) saves an argsort."""
        x = self.decoder_embed(latent)
        if ids_keep is None:
            ids_keep = torch.argsort(ids_restore, dim=1)[:, :x.shape[1] - 1]
        x = ops.mae_unshuffle(x, self.mask_token, self.decoder_pos_embed, ids_keep, ids_restore)
        x, _ = run_blocks(self.decoder_blocks, x, self.decoder_norm)
        return self.decoder_pred(x)[:, 1:, :]

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                ids_keep: torch.Tensor | None = None):
        """imgs (B, C, H, W) -> (loss, pred (B, L, p*p*C), mask (B, L)).

        The visible patches: random (``mask_ratio``, default the model's), chosen by ``noise``
        (B, L) (the lowest-noise patches stay), or given as ``ids_keep`` (B, keep) int64
        patch indices, row-major over the grid (reproducible experiments; mask_ratio, if given
        too, must leave the same number visible). Raises ValueError for a noise or ids_keep
        that does not fit.
        """
        if ids_keep is not None:
            if noise is not None:
                raise ValueError("give noise or ids_keep, not both")
            length = self.patch_embed.num_patches
            if mask_ratio is not None and visible_count(length, mask_ratio) != ids_keep.shape[-1]:
                raise ValueError(f"mask_ratio {mask_ratio} keeps {visible_count(length, mask_ratio)} of {length} "
                                 f"patches, ids_keep gives {ids_keep.shape[-1]}")
            ids_keep, mask, ids_restore = self.masking_from_ids(ids_keep, imgs.shape[0], imgs.device)
        else:
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            ids_keep, mask, ids_restore = self.masking(imgs.shape[0], ratio, noise, imgs.device)
        pred = self.forward_decoder(self.encode_visible(imgs, ids_keep), ids_restore, ids_keep)
        loss = ops.mae_loss(pred, imgs, mask, self.patch_embed.patch_size, self.norm_pix_loss)
        return loss, pred, mask

    def reconstruct(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Predictions back to image space; undoes norm_pix with each patch's own statistics."""
        p = self.patch_embed.patch_size
        if self.norm_pix_loss:
            target = ops.patchify(imgs, p)
            mean = target.mean(-1, keepdim=True)
            std = (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        return ops.unpatchify(pred, p, self.in_chans, self.patch_embed.grid)


def visible_count(length: int, mask_ratio: float) -> int:
    """Patches left visible: L * (1 - mask_ratio) rounded down (``int()``, as
    facebookresearch/mae: 19 of 196 at 0.9), with a 1e-9 guard so that a product that is an
    integer in exact arithmetic (400 * (1 - 0.9) = 39.999...) is not rounded down a whole patch."""
    return int(length * (1 - mask_ratio) + 1e-9)


def _on(t: torch.Tensor, device: torch.device | str | None) -> bool:
    """Whether t is on ``device`` ('cuda' matches any CUDA device, 'cuda:1' only that one)."""
    if device is None:
        return True
    device = torch.device(device)
    return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))


def check_noise(noise: torch.Tensor, b: int, length: int, device: torch.device | None) -> None:
    """Raises ValueError unless ``noise`` is a floating-point (b, length) tensor on ``device``."""
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (b, length):
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must have shape (batch, patches) = {(b, length)}, got {got}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if not _on(noise, device):
        raise ValueError(f"noise is on {noise.device}, the images on {device}")


def check_ids_keep(ids_keep: torch.Tensor, b: int, length: int, device: torch.device | None) -> None:
    """Raises ValueError unless ``ids_keep`` is an int64 (b, keep) tensor on ``device`` whose
    rows hold distinct patch indices in [0, length), keep <= length."""
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.ndim != 2 or ids_keep.shape[0] != b \
            or ids_keep.shape[1] > length:
        got = tuple(ids_keep.shape) if isinstance(ids_keep, torch.Tensor) else type(ids_keep).__name__
        raise ValueError(f"ids_keep must have shape (batch, keep) = ({b}, keep <= {length}), got {got}")
    if ids_keep.dtype != torch.int64:
        raise ValueError(f"ids_keep must be int64 patch indices, got {ids_keep.dtype}")
    if not _on(ids_keep, device):
        raise ValueError(f"ids_keep is on {ids_keep.device}, the images on {device}")
    if ids_keep.numel() == 0:
        return
    ordered = ids_keep.sort(dim=1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    outside = (ordered[:, 0] < 0) | (ordered[:, -1] >= length)
    bad = torch.nonzero(repeats | outside).flatten().tolist()  # host-device sync: the rows to name
    if bad:
        row = bad[0]
        raise ValueError(f"ids_keep row {row} must hold distinct patch indices in [0, {length}), got "
                         f"{ids_keep[row].tolist()}")


def mae(name: str = "vit_base", **kwargs) -> MaskedAutoencoderViT:
    """An MAE with a preset encoder ('vit_tiny' ... 'vit_huge'); kwargs override."""
    cfg = preset(name)
    args = dict(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    args.update(kwargs)
    return MaskedAutoencoderViT(**args)
