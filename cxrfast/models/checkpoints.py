"""Checkpoint import and export as pure functions over state dicts.

- Import facebookresearch/mae and RETFound ``.pth`` files (``{'model': state_dict}``) into
  our MAE or classifier: unwrap, strip ``module.`` prefixes, fold the source's input
  normalisation into the patch embedding (and the pixel decoder head), turn 3-channel patch
  embeddings into 1 channel (sum over RGB: a grey image fed as R=G=B gives the same response)
  or 1 into 3 (repeat / 3), all in fp64, and resample position embeddings to another grid,
  in fp32.
- The source normalisation (:func:`source_normalisation`): a ``normalisation`` entry
  ``{'mean': [...], 'std': [...]}`` in the file if it has one; cxrfast's grey one for a cxrfast
  checkpoint (it has a ``config`` entry); ImageNet's mean/std for any other 3-channel patch
  embedding (facebookresearch/mae, RETFound and timm all train on ImageNet-normalised RGB);
  a grey checkpoint of unknown origin is taken as normalised like the model.
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


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(value - mean) / std`` applied to [0, 1] pixel values before a model sees
    them; one entry means every channel (a grey image replicated to 3 channels)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"normalisation needs as many means as stds, got {self.mean} and {self.std}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"normalisation stds must be positive, got {self.std}")

    def per_channel(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (channels,), std (channels,)) float64."""
        if len(self.mean) not in (1, channels):
            raise ValueError(f"a {len(self.mean)}-channel normalisation does not fit {channels} channels")
        mean = torch.tensor(self.mean, dtype=torch.float64).expand(channels)
        std = torch.tensor(self.std, dtype=torch.float64).expand(channels)
        return mean, std


# torchvision's ImageNet statistics, what facebookresearch/mae, RETFound and timm ViTs were trained on.
IMAGENET = Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# cxrfast's input: (grey - 0.5) / 0.25 on every channel; equals cxrfast.data.augment.MEAN, STD (a model
# never imports a loader; tests/test_checkpoint_fold.py checks the two agree).
CXR_GREY = Normalisation((0.5,), (0.25,))


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


def source_normalisation(checkpoint: Any) -> Normalisation | None:
    """The input normalisation a checkpoint's weights were trained with, as far as it says.

    A ``normalisation`` entry (``{'mean': [...], 'std': [...]}``) wins; a cxrfast checkpoint
    (with a ``config`` entry) is cxrfast's grey one; otherwise None: :func:`filter_for` then
    takes ImageNet's for a 3-channel patch embedding and the model's own for a grey one.
    Raises CheckpointError for an unreadable ``normalisation`` entry.
    """
    if not isinstance(checkpoint, Mapping):
        return None
    record = checkpoint.get("normalisation")
    if record is not None:
        try:
            return Normalisation(tuple(float(v) for v in record["mean"]), tuple(float(v) for v in record["std"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"its 'normalisation' entry {record!r} is not {{'mean': [...], 'std': [...]}} "
                                  f"of matching lengths with positive stds ({_first_sentence(exc)})") from None
    if isinstance(checkpoint.get("config"), Mapping):
        return CXR_GREY
    return None


def slim(checkpoint: Mapping[str, Any], name: str = "checkpoint") -> dict[str, Any]:
    """``{'model': state dict}`` without the optimizer and the rest, keeping what loading needs
    to know besides the tensors (the source normalisation, as a ``normalisation`` entry)."""
    out: dict[str, Any] = {"model": unwrap(checkpoint)}
    try:
        norm = source_normalisation(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    if norm is not None:
        out["normalisation"] = {"mean": list(norm.mean), "std": list(norm.std)}
    return out


def adapt_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(D, C, p, p) -> (D, in_chans, p, p): sum over C for grey (R=G=B inputs give the same
    tokens), repeat / in_chans from grey, in float64. Changes channels only; see
    :func:`convert_patch_embed`."""
    c = weight.shape[1]
    if c == in_chans:
        return weight
    w = weight.double()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    elif c == 1:
        w = w.repeat(1, in_chans, 1, 1) / in_chans
    else:
        raise ValueError(f"cannot convert a {c}-channel patch embedding to {in_chans} channels")
    return w.to(weight.dtype)


def fold_normalisation(weight: torch.Tensor, bias: torch.Tensor, source: Normalisation,
                       target: Normalisation) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch embedding weight (D, C, p, p) and bias (D,) for inputs normalised by ``target``
    instead of ``source``, giving the same tokens for the same pixels.

    With x_c = (g_c - m_c) / s_c (source) and y_c = (g_c - t_c) / u_c (target):
    W_c x_c = (W_c u_c / s_c) y_c + sum(W_c) (t_c - m_c) / s_c, sum over the kernel's p x p
    entries. Computed in float64, returned in the inputs' dtypes.
    """
    c = weight.shape[1]
    mean, std = source.per_channel(c)
    t_mean, t_std = target.per_channel(c)
    w = weight.double()
    folded = w * (t_std / std).view(1, c, 1, 1)
    shift = (w.sum(dim=(2, 3)) * ((t_mean - mean) / std)).sum(dim=1)
    return folded.to(weight.dtype), (bias.double() + shift).to(bias.dtype)


def convert_patch_embed(weight: torch.Tensor, bias: torch.Tensor | None, in_chans: int,
                        source: Normalisation, target: Normalisation) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (D, in_chans, p, p), bias (D,)) for a model fed grey images normalised by
    ``target``, from a patch embedding trained on ``source``-normalised inputs: the fold
    (:func:`fold_normalisation`) in the wider channel space, then the channel change. Exact
    for a grey image replicated to the source's channels. A missing bias counts as zero."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    if in_chans > weight.shape[1]:
        weight = adapt_patch_embed(weight, in_chans)
    weight, bias = fold_normalisation(weight, bias, source, target)
    return adapt_patch_embed(weight, in_chans), bias


def _pred_channels(rows: int, in_chans: int) -> int | None:
    """Channels C of a decoder_pred with p*p*C rows (3 * a square is never a square)."""
    for c in (in_chans, 1, 3):
        if rows % c == 0 and math.isqrt(rows // c) ** 2 == rows // c:
            return c
    return None


def adapt_decoder_pred(param: torch.Tensor, in_chans: int, source: Normalisation | None = None,
                       target: Normalisation | None = None) -> torch.Tensor:
    """decoder_pred weight (p*p*C, D) or bias (p*p*C,), rows (p, q, channel) with channel
    fastest, for ``in_chans`` output channels.

    Without normalisations (normalised-patch targets, norm_pix_loss): RGB -> grey averages the
    three predictions of each pixel, grey -> RGB repeats them. With ``source`` and ``target``
    (pixel targets): each prediction is taken back to [0, 1] pixels (s_c x + m_c), channels
    averaged or repeated, and normalised as the model's target ((v - t) / u): for a grey image
    the converted head predicts exactly the RGB head's (averaged) pixels.
    """
    rows, rest = param.shape[0], param.shape[1:]
    c = _pred_channels(rows, in_chans)
    fold = source is not None and target is not None and source != target
    if c is None or (c == in_chans and not fold) or (c != in_chans and 3 not in (c, in_chans)):
        return param
    is_bias = param.ndim == 1
    view = (1, -1) + (1,) * len(rest)
    shaped = param.double().reshape(rows // c, c, *rest)
    if fold:
        mean, std = source.per_channel(c)
        shaped = shaped * std.view(view) + (mean.view(view) if is_bias else 0.0)
    if c == 3 and in_chans == 1:
        shaped = shaped.mean(1, keepdim=True)
    elif c == 1 and in_chans == 3:
        shaped = shaped.repeat_interleave(3, dim=1)
    if fold:
        t_mean, t_std = target.per_channel(in_chans)
        shaped = (shaped - (t_mean.view(view) if is_bias else 0.0)) / t_std.view(view)
    return shaped.reshape(-1, *rest).to(param.dtype)


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
    folded: str = ""  # the input normalisation folded into the patch embedding, if any

    @property
    def unexpected_mismatches(self) -> list[tuple[str, tuple, tuple]]:
        """Mismatches outside the known conversions (a head for other classes is expected)."""
        return [m for m in self.mismatched if not m[0].startswith(HEAD_PREFIXES)]


def _describe_norm(norm: Normalisation) -> str:
    name = "ImageNet" if norm == IMAGENET else "cxrfast grey" if norm == CXR_GREY else "given"
    return f"{name} mean {list(norm.mean)} std {list(norm.std)}"


def _patch_embed_pair(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Normalisation,
                      target: Normalisation) -> dict[str, torch.Tensor]:
    """The converted patch_embed.proj weight and bias (they change together), or {} when the
    checkpoint has no 4-D patch embedding or no conversion applies."""
    weight, bias = state_dict.get("patch_embed.proj.weight"), state_dict.get("patch_embed.proj.bias")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        return {}
    try:
        weight, bias = convert_patch_embed(weight, bias, model.in_chans, source, target)
    except ValueError:  # no known conversion applies: reported as a mismatch by the caller
        return {}
    return {"patch_embed.proj.weight": weight, "patch_embed.proj.bias": bias}


def filter_for(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source_norm: Normalisation | None = None,
               target_norm: Normalisation = CXR_GREY) -> Filtered:
    """A new state dict shaped for ``model``: channels and grids adapted; keys the model
    does not have (a decoder for a classifier, a head for an MAE) and tensors whose shape
    still differs after adaptation are left out and listed.

    The source's input normalisation ``source_norm`` (None: ImageNet's for a 3-channel patch
    embedding, else ``target_norm``) is folded into the patch embedding so that the model,
    fed grey images normalised by ``target_norm``, computes what the source computed on the
    same image replicated to its channels; for a model predicting pixels (norm_pix_loss
    False) the decoder head is folded the same way (:func:`adapt_decoder_pred`).
    """
    target = model.state_dict()
    grid = model.patch_embed.grid
    patch = state_dict.get("patch_embed.proj.weight")
    source_channels = patch.shape[1] if isinstance(patch, torch.Tensor) and patch.ndim == 4 else model.in_chans
    source = source_norm or (IMAGENET if source_channels == 3 else target_norm)
    result = Filtered({})
    converted = _patch_embed_pair(model, state_dict, source, target_norm)
    if converted and source != target_norm:
        result.folded = f"input normalisation {_describe_norm(source)} folded into {_describe_norm(target_norm)}"
    pixel_target = not getattr(model, "norm_pix_loss", True)
    for k, v in {**state_dict, **{k: t for k, t in converted.items() if k in target}}.items():
        if k not in target or not isinstance(v, torch.Tensor):
            result.dropped.append(k)
            continue
        original = tuple(state_dict[k].shape) if k in state_dict else tuple(v.shape)
        try:
            if k.startswith("decoder_pred."):
                v = adapt_decoder_pred(v, model.in_chans, *((source, target_norm) if pixel_target else ()))
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
    folded: str = ""  # the input normalisation folded into the patch embedding, if any

    def describe(self) -> str:
        parts = [f"{self.loaded} tensors loaded", f"newly initialised: {self.missing_keys}"]
        if self.folded:
            parts.append(self.folded)
        if self.dropped:
            parts.append(f"dropped (not in this model): {self.dropped}")
        if self.mismatched:
            parts.append("shape-mismatched (left at initialisation): "
                         + ", ".join(f"{k} {list(a)} vs {list(b)}" for k, a, b in self.mismatched))
        return "; ".join(parts)


def check_fits(model: nn.Module, checkpoint: Mapping[str, Any], allow_mismatch: bool = False,
               name: str = "checkpoint", source_norm: Normalisation | None = None) -> Filtered:
    """Filters ``checkpoint`` for ``model`` and refuses a checkpoint that does not fit.

    Works on a model built on the ``meta`` device, so callers can check before allocating
    anything. ``source_norm`` (None: :func:`source_normalisation` of the checkpoint) is the
    input normalisation its weights expect. Raises CheckpointMismatchError when nothing fits,
    or when a tensor outside the known conversions (patch-embedding channels,
    position-embedding grid, heads) has another shape, unless ``allow_mismatch``.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{name}: not a checkpoint (holds a {type(checkpoint).__name__}, not a dict of tensors)")
    try:
        source = source_norm or source_normalisation(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    filtered = filter_for(model, unwrap(checkpoint), source)
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
                    allow_mismatch: bool = False, name: str | None = None,
                    source_norm: Normalisation | None = None) -> LoadReport:
    """Loads a facebookresearch/mae, RETFound, timm or cxrfast checkpoint into ``model``.

    Files are read as data only (:func:`load_file`). The checkpoint's input normalisation
    (``source_norm``, or :func:`source_normalisation`: ImageNet's for 3-channel sources by
    default) is folded into the patch embedding for cxrfast's grey input. Returns a LoadReport
    listing every key left at initialisation, dropped or shape-mismatched, and the fold.
    Raises CheckpointMismatchError as :func:`check_fits` does; with ``strict`` any missing key
    raises KeyError.
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        source = load_file(source)
    filtered = check_fits(model, source, allow_mismatch, name or "checkpoint", source_norm)
    result = model.load_state_dict(filtered.state_dict, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise KeyError(f"missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}")
    return LoadReport(list(result.missing_keys), list(result.unexpected_keys), filtered.dropped,
                      filtered.mismatched, len(filtered.state_dict), filtered.folded)


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
