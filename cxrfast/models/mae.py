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
        of int(L * (1 - mask_ratio)) patches per sample stays; ``noise`` (B, L) makes the choice
        reproducible (the lowest-noise patches stay)."""
        length = self.patch_embed.num_patches
        if noise is None:
            noise = torch.rand(b, length, device=device)
        return mask_ids(noise, int(length * (1 - mask_ratio)))

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keeps a random subset of int(L * (1 - mask_ratio)) tokens of x (B, L, D) per sample
        (facebookresearch/mae's interface): (kept (B, keep, D), mask (B, L), ids_restore)."""
        b, length, d = x.shape
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        ids_keep, mask, ids_restore = mask_ids(noise, int(length * (1 - mask_ratio)))
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

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """imgs (B, C, H, W) -> (loss, pred (B, L, p*p*C), mask (B, L))."""
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


def mae(name: str = "vit_base", **kwargs) -> MaskedAutoencoderViT:
    """An MAE with a preset encoder ('vit_tiny' ... 'vit_huge'); kwargs override."""
    cfg = preset(name)
    args = dict(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    args.update(kwargs)
    return MaskedAutoencoderViT(**args)
