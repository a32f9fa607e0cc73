"""The ViT classifier for fine-tuning (timm ``VisionTransformer`` names: fc_norm, head)."""
from __future__ import annotations

import torch
from torch import nn

from .vit import LayerNorm, ViTEncoder, init_weights, preset


class VisionTransformerClassifier(ViTEncoder):
    """Encoder + global-average-pool (fc_norm) or CLS-token head; multi-label logits."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, num_classes: int = 14, global_pool: bool = True,
                 drop_path_rate: float = 0.1, mlp_ratio: float = 4.0):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.pos_embed.requires_grad_(True)  # fine-tuning learns it from its initial value
        self.apply(init_weights)
        self.init_encoder()
        nn.init.trunc_normal_(self.head.weight, std=2e-5)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))


def classifier(name: str = "vit_base", **kwargs) -> VisionTransformerClassifier:
    cfg = preset(name)
    args = dict(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    args.update(kwargs)
    return VisionTransformerClassifier(**args)
