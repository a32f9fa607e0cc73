"""Checkpoint import and export as pure functions over state dicts.

- Import facebookresearch/mae and RETFound ``.pth`` files (``{'model': state_dict}``) into
  our MAE or classifier: unwrap, strip ``module.`` prefixes, turn 3-channel patch embeddings
  into 1 channel (sum over RGB: a grey image fed as R=G=B gives the same response) or 1 into
  3 (repeat / 3), and resample position embeddings to another grid, in fp32.
- Export the encoder in timm's ``VisionTransformer`` key layout as ``.pth`` or
  ``.safetensors``.

Files are read with ``torch.load(weights_only=True)``: a checkpoint is data, never code. Only
tensors, numbers, strings, containers and argparse.Namespace (facebookresearch/mae and
RETFound keep their command line under ``args``) are accepted; anything else is refused.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.", "head.")
DECODER_PREFIXES = ("mask_token", "decoder_")
# Keys whose shape may differ without anything being wrong: a head for another label set.
HEAD_PREFIXES = ("head.",)
# Classes a published checkpoint may hold besides tensors and plain containers.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose unpickling would construct arbitrary Python objects (run code)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose tensors do not fit the model (another preset, patch size...)."""


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return re.split(r"(?<=[.:]) ", text, maxsplit=1)[0][:200] or type(exc).__name__


def load_file(path: str | os.PathLike) -> Any:
    """The object in a ``.pth``/``.safetensors`` file, read as data only.

    Raises CheckpointError for a missing, truncated or garbage file and
    UnsafeCheckpointError (naming the classes) for a pickle that would need arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except Exception as exc:  # safetensors raises its own error type for any bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_sentence(exc)})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: garbage or the legacy format
            unsafe = []
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused: it holds pickled Python objects ({', '.join(unsafe)}) whose loading could run "
                "code; a checkpoint may hold only tensors, numbers, strings, lists, dicts and argparse.Namespace"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_sentence(exc)})") from None
    except Exception as exc:  # truncated zip, empty file, bad header; garbage can raise anything (IndexError...)
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not written by torch.save: "
                              f"{_first_sentence(exc)})") from None


def saved_config(checkpoint: Any) -> dict[str, Any]:
    """``model``, ``img_size`` and ``in_chans`` as far as the checkpoint records them.

    cxrfast keeps its config under ``config``; facebookresearch/mae and RETFound keep their
    argparse namespace under ``args`` (``model='mae_vit_base_patch16'``, ``input_size``).
    """
    from .vit import PRESETS

    if not isinstance(checkpoint, Mapping):
        return {}
    cfg = checkpoint.get("config")
    if isinstance(cfg, Mapping):
        return {k: cfg[k] for k in ("model", "img_size", "in_chans") if cfg.get(k) is not None}
    args = checkpoint.get("args")
    out: dict[str, Any] = {}
    if isinstance(args, argparse.Namespace):
        m = re.search(r"vit_(tiny|small|base|large|huge)_patch(\d+)", str(getattr(args, "model", "")))
        name = f"vit_{m.group(1)}" if m else None
        if name in PRESETS and PRESETS[name].patch_size == int(m.group(2)):
            out["model"] = name
        if isinstance(getattr(args, "input_size", None), int):
            out["img_size"] = args.input_size
    return out


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


@dataclass
class Filtered:
    """What :func:`filter_for` made of a checkpoint for one model."""

    state_dict: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model shape)

    @property
    def unexpected_mismatches(self) -> list[tuple[str, tuple, tuple]]:
        """Mismatches outside the known conversions (a head for other classes is expected)."""
        return [m for m in self.mismatched if not m[0].startswith(HEAD_PREFIXES)]


def filter_for(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Filtered:
    """A new state dict shaped for ``model``: channels and grids adapted; keys the model
    does not have (a decoder for a classifier, a head for an MAE) and tensors whose shape
    still differs after adaptation are left out and listed."""
    target = model.state_dict()
    grid = model.patch_embed.grid
    result = Filtered({})
    for k, v in state_dict.items():
        if k not in target or not isinstance(v, torch.Tensor):
            result.dropped.append(k)
            continue
        original = tuple(v.shape)
        try:
            if k == "patch_embed.proj.weight" and v.ndim == 4:
                v = adapt_patch_embed(v, target[k].shape[1])
            elif k.startswith("decoder_pred.") and v.shape != target[k].shape:
                v = adapt_decoder_pred(v, model.in_chans)
            elif k in ("pos_embed", "decoder_pos_embed") and v.ndim == 3:
                v = resample_pos_embed(v, grid)
        except ValueError:  # no known conversion applies: reported as a mismatch below
            pass
        if v.shape != target[k].shape:
            result.mismatched.append((k, original, tuple(target[k].shape)))
            continue
        result.state_dict[k] = v
    return result


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: torch's missing/unexpected keys plus what was left out."""

    missing_keys: list[str]  # model keys left at their initialisation
    unexpected_keys: list[str]
    dropped: list[str]  # checkpoint keys the model does not have
    mismatched: list[tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape), not loaded
    loaded: int

    def describe(self) -> str:
        parts = [f"{self.loaded} tensors loaded", f"newly initialised: {self.missing_keys}"]
        if self.dropped:
            parts.append(f"dropped (not in this model): {self.dropped}")
        if self.mismatched:
            parts.append("shape-mismatched (left at initialisation): "
                         + ", ".join(f"{k} {list(a)} vs {list(b)}" for k, a, b in self.mismatched))
        return "; ".join(parts)


def check_fits(model: nn.Module, checkpoint: Mapping[str, Any], allow_mismatch: bool = False,
               name: str = "checkpoint") -> Filtered:
    """Filters ``checkpoint`` for ``model`` and refuses a checkpoint that does not fit.

    Works on a model built on the ``meta`` device, so callers can check before allocating
    anything. Raises CheckpointMismatchError when nothing fits, or when a tensor outside the
    known conversions (patch-embedding channels, position-embedding grid, heads) has another
    shape, unless ``allow_mismatch``.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{name}: not a checkpoint (holds a {type(checkpoint).__name__}, not a dict of tensors)")
    filtered = filter_for(model, unwrap(checkpoint))
    bad = filtered.unexpected_mismatches
    if bad and not allow_mismatch:
        shown = ", ".join(f"{k} {list(a)} vs {list(b)}" for k, a, b in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointMismatchError(f"{name}: {len(bad)} tensors do not fit the model (checkpoint vs model shape: "
                                      f"{shown}{more}); is the model preset right? --allow_mismatch true loads "
                                      "the rest")
    if not filtered.state_dict:
        raise CheckpointMismatchError(f"{name}: none of its {len(filtered.dropped) + len(filtered.mismatched)} "
                                      "tensors fits the model")
    return filtered


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], strict: bool = False,
                    allow_mismatch: bool = False, name: str | None = None) -> LoadReport:
    """Loads a facebookresearch/mae, RETFound, timm or cxrfast checkpoint into ``model``.

    Files are read as data only (:func:`load_file`). Returns a LoadReport listing every key
    left at initialisation, dropped or shape-mismatched. Raises CheckpointMismatchError as
    :func:`check_fits` does; with ``strict`` any missing key raises KeyError.
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        source = load_file(source)
    filtered = check_fits(model, source, allow_mismatch, name or "checkpoint")
    result = model.load_state_dict(filtered.state_dict, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise KeyError(f"missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}")
    return LoadReport(list(result.missing_keys), list(result.unexpected_keys), filtered.dropped,
                      filtered.mismatched, len(filtered.state_dict))


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
