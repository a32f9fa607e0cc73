"""Random resized crops and flips for every torch-side loader, and the native crop-resize.

Boxes and flips are drawn per sample from (seed, epoch, index) with a counter-based hash
(splitmix64), vectorised over a whole batch: the same sample gets the same crop in every
backend, whatever the worker count, and a resumed run repeats the crops of the killed one,
without building a torch random generator per sample (about 14 us each in Python).
The recipe is torchvision's RandomResizedCrop: area fraction uniform in ``scale``, log-aspect
uniform in ``ratio``, 10 tries, then a centred square.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cxrfast import _dicom

MEAN, STD = 0.5, 0.25  # grey-level normalisation of [0, 1] display images
RATIO = (3 / 4, 4 / 3)
TRIES = 10
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epochs, indices, count: int) -> np.ndarray:
    """(B, count) float64 uniforms in [0, 1), a pure function of (seed, epoch, index, column)."""
    index = np.atleast_1d(np.asarray(indices, dtype=np.int64)).astype(np.uint64)
    epoch = np.broadcast_to(np.asarray(epochs, dtype=np.int64), index.shape).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.full(index.shape, seed & (2**64 - 1), np.uint64) + _GOLDEN)
        key = _mix(key ^ (epoch + _GOLDEN))
        key = _mix(key ^ (index + _GOLDEN))
        columns = (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _mix(key[:, None] + columns)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def draw_crops(heights, widths, indices, *, seed: int, epochs, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO, hflip: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (B, 4) int64 as (top, left, height, width) inside each image, and mirror flags (B,)."""
    u = uniforms(seed, epochs, indices, 4 * TRIES + 1)
    b = u.shape[0]
    h = np.broadcast_to(np.asarray(heights, dtype=np.int64), (b,))[:, None]
    w = np.broadcast_to(np.asarray(widths, dtype=np.int64), (b,))[:, None]
    tries = u[:, :4 * TRIES].reshape(b, TRIES, 4)
    target = (h * w) * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    cw = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    top = np.floor(tries[..., 2] * (h - ch + 1)).astype(np.int64)
    left = np.floor(tries[..., 3] * (w - cw + 1)).astype(np.int64)
    first = fits.argmax(axis=1)
    rows = np.arange(b)
    side = np.minimum(h, w)[:, 0]
    found = fits[rows, first]
    boxes = np.where(found[:, None],
                     np.stack([top[rows, first], left[rows, first], ch[rows, first], cw[rows, first]], axis=1),
                     np.stack([(h[:, 0] - side) // 2, (w[:, 0] - side) // 2, side, side], axis=1))
    mirror = u[:, -1] < hflip
    return boxes.astype(np.int64), mirror


def whole_images(heights, widths, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes covering each whole image and no mirroring (evaluation)."""
    boxes = np.zeros((count, 4), np.int64)
    boxes[:, 2], boxes[:, 3] = heights, widths
    return boxes, np.zeros(count, bool)


def triangle_matrices(starts, lengths, size: int, extent: int, mirror=None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, size, extent) float32 resampling matrices for one axis: row o of matrix b takes
    [starts[b], starts[b] + lengths[b]) of an axis of ``extent`` samples onto output o with the
    antialiased triangle filter of the native crop-resize (rows sum to 1; rows reversed where
    ``mirror``). ``wy @ image @ wx.mT`` is then the crop-resize of a whole batch as two batched
    matmuls - how the torch GPU path gets the CPU path's numbers."""
    start = torch.as_tensor(np.asarray(starts), dtype=torch.float64, device=device)[:, None, None]
    length = torch.as_tensor(np.asarray(lengths), dtype=torch.float64, device=device)[:, None, None]
    scale = length / size
    support = torch.clamp(scale, min=1.0)
    out = torch.arange(size, dtype=torch.float64, device=device)[None, :, None]
    pos = torch.arange(extent, dtype=torch.float64, device=device)[None, None, :]
    center = start + (out + 0.5) * scale
    w = torch.clamp(1.0 - ((pos + 0.5 - center) / support).abs(), min=0.0)
    w = torch.where((pos >= start) & (pos < start + length), w, 0.0)
    w = w / w.sum(-1, keepdim=True)  # the input sample under each centre always has weight > 0
    if mirror is not None:
        flip = torch.as_tensor(np.asarray(mirror), dtype=torch.bool, device=device)[:, None, None]
        w = torch.where(flip, w.flip(1), w)
    return w.float()


def _storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (and arrays) hold t's memory; None where torch cannot say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(t.untyped_storage()._cdata)


class OutputPool:
    """Batch outputs for one process, reusing memory that nothing holds any more.

    A fresh 12 MB batch costs a page fault per 4 KiB page on first write, which on a 2-core
    VM took as long as the crop-resize itself. A pooled buffer is handed out as a new view and
    reused only when no tensor, view or array other than the pool's own refers to its memory;
    in a DataLoader worker every batch goes to new shared memory (the training process holds
    it), and without torch's use count every batch is fresh.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when idle)

    def get(self, shape: tuple[int, ...]) -> torch.Tensor:
        if torch.utils.data.get_worker_info() is not None:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
            return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)
        for buffer, idle in self.buffers:
            if buffer.shape == shape and _storage_users(buffer) == idle:
                return buffer.view(shape)
        buffer = torch.empty(shape, dtype=torch.float32)
        idle = _storage_users(buffer)
        if idle is not None:
            self.buffers.append((buffer, idle))
            del self.buffers[:-self.keep]
        return buffer.view(shape)


def normalisation(value_scale: float, mean: float = MEAN, std: float = STD) -> tuple[float, float]:
    """(gain, offset) with value * gain + offset == (value / value_scale - mean) / std."""
    return 1.0 / (value_scale * std), -mean / std


def crop_resize(images: list[np.ndarray], boxes: np.ndarray, mirror: np.ndarray, size: int, *, value_scale: float,
                mean: float, std: float, out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """Each box of each 2-D image (uint8, uint16 or float32) resized to size x size with the
    antialiased bilinear filter (torch's antialias=True), mirrored where asked, and normalised
    as (value / value_scale - mean) / std: a (B, 1, size, size) float32 tensor, computed in
    native threads with the GIL released."""
    if out is None:
        out = torch.empty((len(images), 1, size, size))
    if threads is None:
        threads = torch.get_num_threads()
    gain, offset = normalisation(value_scale, mean, std)
    _dicom.crop_resize(images, boxes, mirror, out.numpy().reshape(len(images), size, size), gain, offset, threads)
    return out
