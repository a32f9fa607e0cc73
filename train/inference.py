"""Batched inference for validation, evaluation, prediction and export: a model rebuilt from
a checkpoint (:func:`load_model`), class scores and pooled encoder features (:func:`predict`).

Every score stays tied to the dataset index of the image it came from. An image that cannot
be read is dropped with its index (and so its labels), never replaced by another file. Under
DDP each rank scores its own share of the indices and the shares are gathered, so every
rank ends with the same predictions, in dataset order, each index once.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from cxrfast.data.augment import MEAN, STD
from cxrfast import errorfile
from cxrfast.data.direct import UnreadableImage
from cxrfast.data.shards import FetchedBatch, collate
from cxrfast.models import PRESETS, VisionTransformerClassifier, classifier
from cxrfast.models.checkpoints import CheckpointError, CheckpointMismatchError, load_file, saved_config, unwrap

from . import logs, runtime
from .config import UsageError


@dataclass
class Predictions:
    """Scores (N, K) or features (N, D) of the images read, their dataset indices (N,), and
    (index, path, error class, reason) of each image that could not be read; ``total`` images were
    asked for. ``outputs`` holds every requested output by name (``values`` is the first of them)."""

    indices: np.ndarray
    values: np.ndarray
    total: int
    failed: list[tuple[int, str, str, str]] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def unreadable(self) -> int:
        return len(self.failed)


@dataclass
class ModelSpec:
    """What a checkpoint says about the model and its input: preset, size, channels, pooling,
    the grey-level normalisation x = (g - mean) / std of display images g in [0, 1] (one value
    per channel), and the label names when it has a classifier head."""

    model: str
    img_size: int
    in_chans: int
    global_pool: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: list[str]
    has_head: bool
    decode_size: int | None = None

    @property
    def patch_size(self) -> int:
        return PRESETS[self.model].patch_size


def _preset_of(state: Mapping[str, torch.Tensor], name: str) -> str:
    """The preset whose width, depth and patch size the weights have (for a checkpoint whose
    config does not name it)."""
    try:
        dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    except KeyError:
        raise CheckpointError(f"{name}: no ViT encoder in it (no cls_token / patch_embed weights)") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for preset_name, p in PRESETS.items():
        if (p.embed_dim, p.depth, p.patch_size) == (dim, depth, patch):
            return preset_name
    raise CheckpointError(f"{name}: a ViT of width {dim}, depth {depth}, patch {patch} is none of the presets "
                          f"{', '.join(PRESETS)}")


def _per_channel(value: Any, in_chans: int, key: str, name: str) -> tuple[float, ...]:
    """A config's mean or std as one value per channel (a single value is repeated)."""
    values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if len(values) == 1:
        values = values * in_chans
    if len(values) != in_chans or not all(math.isfinite(v) for v in values):
        raise CheckpointMismatchError(f"{name}: its config's {key} {list(values)} does not fit {in_chans} channel(s)")
    if key == "std" and not all(v > 0 for v in values):
        raise CheckpointMismatchError(f"{name}: its config's std {list(values)} must be positive")
    return values


def _agreed(config_value: Any, weights_value: int, key: str, name: str) -> int:
    """The weights' value; a config that says otherwise is a CheckpointMismatchError."""
    if config_value is not None and int(config_value) != weights_value:
        raise CheckpointMismatchError(f"{name}: its config says {key} {config_value} but its weights are for "
                                      f"{key} {weights_value}")
    return weights_value


def model_spec(ckpt: Any, name: str) -> ModelSpec:
    """The ModelSpec of a loaded checkpoint, from its saved config checked against its weights:
    a config whose image size or channels the weights contradict is a CheckpointMismatchError."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict of tensors)")
    state = unwrap(ckpt)
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    known = saved_config(ckpt)
    model = known.get("model") or _preset_of(state, name)
    if model not in PRESETS:
        raise CheckpointError(f"{name}: model {model!r} is none of the presets {', '.join(PRESETS)}")
    weight, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if weight is None or pos is None:
        raise CheckpointError(f"{name}: no ViT encoder in it (no patch_embed / pos_embed weights)")
    in_chans = _agreed(known.get("in_chans"), int(weight.shape[1]), "in_chans", name)
    side = math.isqrt(pos.shape[1] - 1)
    img_size = _agreed(known.get("img_size"), side * PRESETS[model].patch_size, "img_size", name)
    has_head = "head.weight" in state
    pool = cfg.get("global_pool")
    global_pool = bool(pool) if pool is not None else ("fc_norm.weight" in state or not has_head)
    k = int(state["head.weight"].shape[0]) if has_head else 0
    names = [str(n) for n in ckpt.get("label_names") or [f"class_{i}" for i in range(k)]] if has_head else []
    if has_head and len(names) != k:
        raise CheckpointMismatchError(f"{name}: {len(names)} label names for a head of {k} outputs")
    return ModelSpec(model, img_size, in_chans, global_pool, _per_channel(cfg.get("mean", MEAN), in_chans, "mean", name),
                     _per_channel(cfg.get("std", STD), in_chans, "std", name), names, has_head,
                     cfg.get("decode_size"))


def load_model(path: str | os.PathLike) -> tuple[VisionTransformerClassifier, ModelSpec]:
    """The classifier (eval mode, CPU) a checkpoint describes, with every weight it needs.

    A fine-tuned checkpoint must fit exactly (every key and shape). A pretraining (MAE) or
    other encoder-only checkpoint has no head: its encoder is loaded, the decoder left out,
    and the pooling norm (fc_norm, for mean pooling) stays at its identity initialisation,
    as in train.evaluate's linear probe; ``spec.has_head`` is then False."""
    path = Path(path)
    ckpt = load_file(path)  # data only: a checkpoint cannot run code
    spec = model_spec(ckpt, str(path))
    with warnings.catch_warnings():  # a headless model has a 0-output head, whose init torch warns about
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        model = classifier(spec.model, img_size=spec.img_size, in_chans=spec.in_chans,
                           num_classes=len(spec.label_names), global_pool=spec.global_pool, drop_path_rate=0.0)
    state = {k: v for k, v in unwrap(ckpt).items() if not k.startswith(("decoder", "mask_token"))}
    if not spec.has_head:
        state = {k: v for k, v in state.items() if not (k.startswith("norm.") and spec.global_pool)}
    result = model.load_state_dict(state, strict=False)
    optional = ("head.", "fc_norm.") if not spec.has_head else ()
    missing = [k for k in result.missing_keys if not k.startswith(optional)]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(f"{path}: does not fit a {spec.model} classifier (missing: "
                                      f"{missing[:4]}, unexpected: {result.unexpected_keys[:4]})")
    return model.eval(), spec


class Renormalised(Dataset):
    """A dataset of images normalised with cxrfast's (MEAN, STD), re-normalised to a
    checkpoint's own per-channel mean/std: x' = (x * STD + MEAN - mean_c) / std_c."""

    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float]):
        self.base = base
        self.scale = torch.tensor([STD / s for s in std], dtype=torch.float32)[:, None, None]
        self.shift = torch.tensor([(MEAN - m) / s for m, s in zip(mean, std)], dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        item = self.base[index]  # UnreadableImage passes through to the caller
        if isinstance(item, (list, tuple)):
            return (item[0] * self.scale + self.shift, *item[1:])
        return item * self.scale + self.shift


def for_spec(dataset: Dataset, spec: ModelSpec) -> Dataset:
    """``dataset`` (normalised by cxrfast.data) as the checkpoint's normalisation wants it."""
    if all(m == MEAN for m in spec.mean) and all(s == STD for s in spec.std):
        return dataset
    return Renormalised(dataset, spec.mean, spec.std)


def check_output(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a file to write: a UsageError naming ``option`` when it is a folder, or
    its nearest existing parent is not a writable folder (nothing is created here)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder {parent} is not writable")
    return path


def make_parent(path: Path, option: str) -> None:
    """Creates the folder ``path`` goes into; a failure is a UsageError naming ``option``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create its folder ({exc.strerror})") from None


class _Indexed(Dataset):
    """Some indices of a dataset -> whole batches of (images read, their indices, failures)."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> FetchedBatch:
        wanted = [self.indices[p] for p in positions]
        if hasattr(self.base, "__getitems__"):  # prepared shards: decoded already, read as one batch
            batch = self.base.__getitems__(wanted)
            x = batch.value if isinstance(batch, FetchedBatch) else batch
            x = x[0] if isinstance(x, (list, tuple)) else x
            return FetchedBatch((x, torch.tensor(wanted, dtype=torch.int64), []))
        images, good, failed = [], [], []
        for i in wanted:
            try:
                item = self.base[i]
            except UnreadableImage as exc:
                failed.append((i, str(exc.path), exc.error, exc.reason))
                continue
            images.append(item[0] if isinstance(item, (list, tuple)) else item)
            good.append(i)
        x = torch.stack(images) if images else torch.zeros(0)
        return FetchedBatch((x, torch.tensor(good, dtype=torch.int64), failed))


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's indices of range(n): every index on exactly one rank (no padding)."""
    return list(range(rank, n, world_size))


OUTPUTS = ("scores", "features")


def _forward(model: torch.nn.Module, x: torch.Tensor, outputs: Sequence[str]) -> list[torch.Tensor]:
    """The requested outputs of one batch; scores and features together share one encoder pass."""
    if list(outputs) == ["scores"]:
        return [torch.sigmoid(model(x))]
    feats = model.forward_features(x)
    return [feats if name == "features" else torch.sigmoid(model.head(feats)) for name in outputs]


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 64,
            features: bool = False, num_workers: int = 0, *, outputs: Sequence[str] | None = None,
            progress: str | None = None) -> Predictions:
    """Sigmoid scores, or pooled features with ``features``, of every readable image, in
    dataset order; under DDP every rank must call it (it gathers across ranks).

    ``outputs`` asks for several at once (e.g. ``("scores", "features")``: one pass over the
    images); each lands in ``Predictions.outputs``. ``progress`` is the label of a progress
    bar over the images (on stderr, rank 0 only); None shows none."""
    names = list(outputs) if outputs is not None else ["features" if features else "scores"]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown or not names:
        raise ValueError(f"outputs must be some of {OUTPUTS}, got {names}")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    part = _Indexed(dataset, shard(len(dataset), rank, world))
    was_training = model.training
    model.eval()
    values: list[list[torch.Tensor]] = [[] for _ in names]
    indices, failed = [], []
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    bar = logs.progress(len(part), 0, progress is not None and rank == 0, progress or "", unit="img")
    for x, idx, bad in loader:
        failed.extend(bad)
        bar.update(len(idx) + len(bad))
        if not len(idx):
            continue
        with runtime.autocast(device):
            ys = _forward(model, x.to(device), names)
        for acc, y in zip(values, ys):
            acc.append(y.float().cpu())  # host sync: one per batch
        indices.append(idx)
    bar.close()
    model.train(was_training)
    mine = (torch.cat(indices).numpy() if indices else np.zeros(0, np.int64),
            [torch.cat(v).numpy() for v in values] if indices else None, failed)
    parts = [mine]
    if distributed:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    return _merge(parts, len(dataset), names)


def _merge(parts: list, total: int, names: Sequence[str] = ("scores",)) -> Predictions:
    """One Predictions from the ranks' shares: sorted by index, each index once."""
    failed = sorted({f[0]: f for p in parts for f in p[2]}.values())
    # each share's values: one array per output (a bare array: the single output)
    blocks = [p[1] if isinstance(p[1], list) else [p[1]] for p in parts if p[1] is not None]
    if not blocks:
        empty = np.zeros((0, 0), np.float32)
        return Predictions(np.zeros(0, np.int64), empty, total, failed, {n: empty for n in names})
    idx = np.concatenate([p[0] for p in parts if p[1] is not None]).astype(np.int64)
    idx, first = np.unique(idx, return_index=True)  # sorted; a repeated index is kept once
    merged = {n: np.concatenate([b[j] for b in blocks])[first] for j, n in enumerate(names)}
    return Predictions(idx, merged[names[0]], total, failed, merged)


def write_errors(path, failed: list[tuple[int, str, str, str]]) -> None:
    """The unreadable images in the errors-file layout (source, error, reason; see
    cxrfast.errorfile), written whole and atomically each time, so a rerun replaces the file."""
    errorfile.write(path, (f[1:] for f in failed))
