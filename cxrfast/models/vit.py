"""ViT building blocks with timm's parameter names (so checkpoints map one to one).

Written here rather than imported from timm: timm needs torchvision, which does not import
beside the CPU build of torch we use. Hot ops go through :mod:`cxrfast.ops`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


@dataclass(frozen=True)
class Preset:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16


PRESETS = {
    "vit_tiny": Preset(192, 12, 3),
    "vit_small": Preset(384, 12, 6),
    "vit_base": Preset(768, 12, 12),
    "vit_large": Preset(1024, 24, 16),
    "vit_huge": Preset(1280, 32, 16, 14),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(PRESETS)}") from None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) computed by cxrfast.ops."""

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, out_dtype)

    def add(self, x: torch.Tensor, residual: torch.Tensor, out_dtype: torch.dtype | None = None,
            branch_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(LN(h), h), h = (x + branch_bias) + residual, in one pass over the activations."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, out_dtype, branch_bias)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C, H, W) -> (B, L, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_patches(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Tokens of the chosen patches only, (B, C, H, W) and ids (B, n) -> (B, n, D): the
        same numbers as ``forward(x)`` gathered at ``ids``, but only those patches' pixels are
        read and embedded (the MAE encoder's visible patches). The pixels are gathered in the
        conv weight's (C, p, p) order and multiplied by that weight viewed as (D, C*p*p)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        b, c = x.shape[:2]
        p, (_, gw) = self.patch_size, self.grid
        grid = x.reshape(b, c, self.grid[0], p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p), a view
        rows = torch.arange(b, device=x.device)[:, None]
        pixels = grid[rows, ids // gw, ids % gw].reshape(b, ids.shape[1], c * p * p)
        weight = self.proj.weight
        return F.linear(pixels, weight.reshape(weight.shape[0], -1), self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, proj_bias: bool = True) -> torch.Tensor:
        """(B, N, dim) -> (B, N, dim); ``proj_bias=False`` leaves out the output projection's
        bias for the caller to add (Block fuses it into the LayerNorm after the residual add)."""
        # (B, N, 3*dim) in, (B, N, dim) out: the op reads q, k, v and writes o through strides,
        # so neither the forward nor the backward copies, selects or zero-fills around it
        o = ops.qkv_attention(x, self.qkv.weight, self.qkv.bias, self.num_heads)
        return self.proj(o) if proj_bias else F.linear(o, self.proj.weight)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's names), computed as one fused op by cxrfast.ops.mlp; ``act``
    stays as a submodule so the module tree matches timm's."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the residual branch)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Block(nn.Module):
    """Pre-norm transformer block (timm layout: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, h = self.attend(x, self.norm1(x, ops.matmul_dtype(x)))
        return h + self.drop_path(self.mlp(y))

    def attend(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half from the block input x and y = norm1(x): (norm2's output, the
        residual stream after attention). The residual add and norm2 are one fused op, and
        the norms write what the next matmul reads (bf16 under autocast) while the stream
        stays in its own dtype (fp32 under autocast, as torch keeps it)."""
        if self.drop_path.p == 0.0 or not self.training:  # proj's bias joins the fused add (no bias-grad sum)
            return self.norm2.add(self.attn(y, proj_bias=False), x, ops.matmul_dtype(x), self.attn.proj.bias)
        return self.norm2.add(self.drop_path(self.attn(y)), x, ops.matmul_dtype(x))

    def forward_into(self, x: torch.Tensor, y: torch.Tensor, norm: LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The block with its closing residual add fused into ``norm`` (the next block's norm1,
        or the stack's final norm): (norm(out), out) from x and y = norm1(x)."""
        y2, h = self.attend(x, y)
        return norm.add(self.drop_path(self.mlp(y2)), h, ops.matmul_dtype(h))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, norm: LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(out), out) for out = the blocks applied to x, with every residual add fused into
    the LayerNorm after it: each stream tensor is written once, read once by the next fused
    op, and its gradient needs no separate accumulation. norm's output feeds a matmul (it is
    written in autocast's dtype); the values equal ``norm(blk_n(...blk_1(x)))``."""
    if len(blocks) == 0:
        return norm(x, ops.matmul_dtype(x)), x
    y = blocks[0].norm1(x, ops.matmul_dtype(x))
    for i, blk in enumerate(blocks):
        y, x = blk.forward_into(x, y, blocks[i + 1].norm1 if i + 1 < len(blocks) else norm)
    return y, x


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, (1 + gh*gw, dim) with a zero row for CLS.

    Half the channels encode the row, half the column; each half is [sin, cos] of the
    position times frequencies 1/10000^(k/(dim/4)) (the MAE paper's embedding).
    """
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4")
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # MAE's grid puts the column coordinate first: emb = [f(col), f(row)].
    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """The encoder trunk shared by MAE and the classifier (timm names at the top level)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # on the host even under a meta device
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rates[i]) for i in range(depth))

    def init_encoder(self) -> None:
        self.pos_embed.data.copy_(sincos_pos_embed(self.embed_dim, self.patch_embed.grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)


def num_layers(depth: int) -> int:
    return depth + 1


def layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


# Parameters exempt from weight decay besides 1-D ones (norms) and biases, by name.
# Fine-tuning (BEiT / MAE main_finetune: model.no_weight_decay()): the learnt tokens and position embedding.
FINETUNE_NO_DECAY: tuple[str, ...] = ("cls_token", "pos_embed", "mask_token")
# Pretraining (MAE main_pretrain: timm's add_weight_decay with no skip list): nothing else, so
# cls_token and mask_token decay; the fixed sin-cos position embeddings do not train at all.
PRETRAIN_NO_DECAY: tuple[str, ...] = ()


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 no_decay: tuple[str, ...] = FINETUNE_NO_DECAY) -> list[dict]:
    """AdamW groups over the parameters that train: no weight decay on biases, 1-D parameters
    (norms) and the names in ``no_decay`` (:data:`FINETUNE_NO_DECAY`, or
    :data:`PRETRAIN_NO_DECAY` for MAE pretraining); lr scaled by
    layer_decay ** (depth + 1 - layer) when layer_decay < 1 (BEiT / MAE fine-tuning)."""
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name in no_decay or name.endswith(".bias"))
        lid = layer_id(name, depth) if layer_decay < 1.0 else 0
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers(depth) - lid) if layer_decay < 1.0 else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
