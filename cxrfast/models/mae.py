"""The MAE ViT (He et al. 2022) for single-channel chest radiographs.

Parameter names follow facebookresearch/mae (``models_mae.py``), so its checkpoints and
RETFound's load one to one. The encoder runs on the visible patches only; a light decoder
reconstructs every patch; the loss counts masked patches only.
"""
from __future__ import annotations

import torch
from torch import nn

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

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keeps a random subset of round(L * (1 - mask_ratio)) patches per sample.

        Returns the kept tokens (B, keep, D), the mask (B, L; 1 = removed) and ids_restore
        (B, L) that unshuffles. ``noise`` (B, L) makes the choice reproducible.
        """
        b, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        latent, _ = run_blocks(self.blocks, x, self.norm)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        masked = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        x, _ = run_blocks(self.decoder_blocks, x, self.decoder_norm)
        return self.decoder_pred(x)[:, 1:, :]

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """imgs (B, C, H, W) -> (loss, pred (B, L, p*p*C), mask (B, L))."""
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio if mask_ratio is None else mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
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
