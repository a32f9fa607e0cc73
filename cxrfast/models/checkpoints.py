"""Checkpoint import and export as pure functions over state dicts.

- Import facebookresearch/mae and RETFound ``.pth`` files (``{'model': state_dict}``) into
  our MAE or classifier: unwrap, strip ``module.`` prefixes, turn 3-channel patch embeddings
  into 1 channel (sum over RGB: a grey image fed as R=G=B gives the same response) or 1 into
  3 (repeat / 3), and resample position embeddings to another grid, in fp32.
- Export the encoder in timm's ``VisionTransformer`` key layout as ``.pth`` or
  ``.safetensors``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.", "head.")
DECODER_PREFIXES = ("mask_token", "decoder_")


def unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint, without DDP/compile prefixes."""
    sd: Any = checkpoint
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def adapt_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(D, C, p, p) -> (D, in_chans, p, p)."""
    c = weight.shape[1]
    if c == in_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    elif c == 1:
        w = w.repeat(1, in_chans, 1, 1) / in_chans
    else:
        raise ValueError(f"cannot convert a {c}-channel patch embedding to {in_chans} channels")
    return w.to(weight.dtype)


def adapt_decoder_pred(param: torch.Tensor, in_chans: int) -> torch.Tensor:
    """decoder_pred rows are (p, q, channel) with channel fastest: RGB -> grey averages the
    three predictions of each pixel, grey -> RGB repeats them."""
    rows = param.shape[0]
    for c in (1, 3):
        if rows % c == 0 and c != in_chans and int(math.isqrt(rows // c)) ** 2 == rows // c:
            shaped = param.float().reshape(rows // c, c, *param.shape[1:])
            if in_chans == 1 and c == 3:
                return shaped.mean(1).to(param.dtype)
            if in_chans == 3 and c == 1:
                return shaped.repeat_interleave(3, dim=1).reshape(rows * 3, *param.shape[1:]).to(param.dtype)
    return param


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + h*w, D) -> (1, prefix + gh*gw, D), bicubic over the patch grid, in fp32."""
    n = pos.shape[1] - prefix_tokens
    if n == grid[0] * grid[1]:
        return pos
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    prefix, patches = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    d = pos.shape[-1]
    patches = patches.float().reshape(1, side, side, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos.dtype)
    return torch.cat([prefix, patches], dim=1)


def filter_for(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict shaped for ``model``: channels and grids adapted, keys the model
    does not have (a decoder for a classifier, a head for an MAE) dropped."""
    target = model.state_dict()
    grid = model.patch_embed.grid
    out = {}
    for k, v in state_dict.items():
        if k not in target:
            continue
        if k == "patch_embed.proj.weight":
            v = adapt_patch_embed(v, target[k].shape[1])
        elif k.startswith("decoder_pred.") and v.shape != target[k].shape:
            v = adapt_decoder_pred(v, model.in_chans)
        elif k in ("pos_embed", "decoder_pos_embed"):
            v = resample_pos_embed(v, grid)
        if v.shape != target[k].shape:
            continue  # e.g. a head for another number of classes: left to its initialisation
        out[k] = v
    return out


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], strict: bool = False):
    """Loads a facebookresearch/mae, RETFound, timm or cxrfast checkpoint into ``model``.

    Returns torch's (missing_keys, unexpected_keys) after filtering; with ``strict`` any
    missing key raises.
    """
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint = load_file(str(source))
    elif isinstance(source, (str, os.PathLike)):
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    else:
        checkpoint = source
    sd = filter_for(model, unwrap(checkpoint))
    result = model.load_state_dict(sd, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise KeyError(f"missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}")
    return result


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder (and head, if any) in timm VisionTransformer names."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def export_timm(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes the encoder as ``.pth`` (a plain state dict) or ``.safetensors``, atomically."""
    path = Path(path)
    sd = {k: v.contiguous() for k, v in encoder_state_dict(model).items()}
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"export path must end in .pth or .safetensors, got {path}")
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, tmp)
    return path
