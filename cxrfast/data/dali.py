"""The DALI pipeline: prepared shards -> random resized crop, flip, normalise -> NCHW tensors.

Samples come from the memmapped shards through ``fn.external_source`` - in batches from the
training process, or per sample from parallel worker processes (``py_workers``) - in the
order of the resumable, rank-sharded sampler (so sharding, per-epoch shuffling and mid-epoch resume work
as in the other paths); cropping, flipping and normalisation run in DALI, on the GPU when
``device_id`` is a GPU and on the CPU with ``device_id=None`` (how the tests run it).
DALI's own random generator draws the crops: the statistics match the torch paths, the
individual crops do not.
"""
from __future__ import annotations

import numpy as np
import torch

from .augment import MEAN, STD
from .sampler import ResumableSampler
from .shards import PreparedData


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _Source:
    """Batch-wise callable for external_source: images (HWC views of the memmapped shards) and
    labels of the next batch, in the sampler's order."""

    def __init__(self, data: PreparedData, batch_size: int, num_labels: int):
        self.data, self.batch_size, self.num_labels = data, batch_size, num_labels
        self.indices = np.empty(0, np.int64)
        self.pos = 0

    def reset(self, indices: np.ndarray) -> None:
        """The epoch's remaining sample indices (ResumableSampler.remaining), in order."""
        self.indices, self.pos = indices, 0

    def __call__(self):
        if self.pos + self.batch_size > len(self.indices):
            raise StopIteration
        chunk = self.indices[self.pos:self.pos + self.batch_size].tolist()
        self.pos += self.batch_size
        images = [self.data.image(i) for i in chunk]  # views into the memmap: no copy on our side
        labels = [self.data.labels[i] if self.data.labels is not None else np.zeros(self.num_labels, np.float32)
                  for i in chunk]
        return [img[:, :, None] for img in images], labels


class _ParallelSource:
    """Per-sample source for DALI's parallel external_source (worker processes).

    Picklable: it carries the folder path, the view's rows (None for a whole folder) and the
    sampler parameters, never the memmaps or index columns (each worker maps its own: at 10 M
    rows a copy per worker would be hundreds of MB). The sample order of an epoch
    is recomputed in the worker from the sampler's seed and the epoch number, so no state has
    to reach the workers once they run: epoch = first epoch + DALI's epoch index.
    """

    def __init__(self, data: PreparedData, sampler: ResumableSampler, num_labels: int):
        self.folder, self.rows = str(data.folder), data.table_rows
        self.has_labels = data.labels is not None
        self.num_labels = num_labels
        self.sampler_args = dict(size=sampler.size, rank=sampler.rank, world_size=sampler.world_size,
                                 seed=sampler.seed, shuffle=sampler.shuffle)
        self.first_epoch, self.start = sampler.epoch, sampler.start
        self._data: PreparedData | None = None
        self._order: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"], state["_order"] = None, {}
        return state

    def _indices(self, epoch_idx: int) -> np.ndarray:
        if epoch_idx not in self._order:
            s = ResumableSampler(**self.sampler_args)
            s.set_epoch(self.first_epoch + epoch_idx, self.start if epoch_idx == 0 else 0)
            self._order = {epoch_idx: s.remaining()}
        return self._order[epoch_idx]

    def __call__(self, info):
        indices = self._indices(info.epoch_idx)
        if info.idx_in_epoch >= len(indices):
            raise StopIteration
        if self._data is None:
            self._data = PreparedData.reopen(self.folder, self.rows)
        index = int(indices[info.idx_in_epoch])
        image = self._data.image(index)[:, :, None]
        label = (self._data.labels_of([index])[0] if self.has_labels
                 else np.zeros(self.num_labels, np.float32))
        return image, label


class DALILoader:
    """Iterates (images,) or (images, labels) batches as torch tensors, one epoch per iteration."""

    def __init__(self, data: PreparedData, sampler: ResumableSampler, *, batch_size: int, img_size: int,
                 train: bool = True, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, seed: int = 0,
                 device_id: int | None = 0, half: str = "bf16", in_chans: int = 1, with_labels: bool = False,
                 num_threads: int = 4, py_workers: int = 0):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        self.data, self.sampler, self.batch_size = data, sampler, batch_size
        self.with_labels = with_labels and data.labels is not None
        num_labels = len(data.label_names)
        self.source = _Source(data, batch_size, num_labels)
        self.parallel = py_workers > 0
        # parallel: worker processes read the memmap per sample (spawned: CUDA-safe)
        extra = dict(py_num_workers=py_workers, py_start_method="spawn") if self.parallel else {}
        source_args = (dict(source=_ParallelSource(data, sampler, num_labels), batch=False, parallel=True)
                       if self.parallel else dict(source=self.source, batch=True))
        scale = data.scale
        out_type = {"bf16": getattr(types, "BFLOAT16", types.FLOAT16), "fp16": types.FLOAT16, "fp32": types.FLOAT}[half]
        self.cast_bf16 = half == "bf16" and not hasattr(types, "BFLOAT16")

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                      prefetch_queue_depth=2, exec_dynamic=True, **extra)
        def pipe():
            images, labels = fn.external_source(**source_args, num_outputs=2, layout=["HWC", None],
                                                dtype=[types.UINT8 if scale == 255 else types.UINT16, types.FLOAT])
            if device_id is not None:
                images = images.gpu()
            if train:
                images = fn.random_resized_crop(images, size=(img_size, img_size), random_area=list(crop_scale),
                                                random_aspect_ratio=[3 / 4, 4 / 3], antialias=True)
                mirror = fn.random.coin_flip(probability=hflip)
            else:
                if img_size != data.meta["size"]:
                    images = fn.resize(images, size=(img_size, img_size), antialias=True)
                mirror = 0
            images = fn.crop_mirror_normalize(images, dtype=out_type, output_layout="CHW", mirror=mirror,
                                              mean=[MEAN * scale], std=[STD * scale])
            return images, labels

        self.pipe = pipe()
        self.pipe.build()
        self.in_chans = in_chans
        self._iterator = None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self.parallel:  # one iterator for the run; each epoch's order is computed in the workers
            if self._iterator is None:
                self._iterator = DALIGenericIterator([self.pipe], ["images", "labels"], auto_reset=True,
                                                     last_batch_policy=LastBatchPolicy.DROP)
            it = self._iterator
        else:  # the batch source is told each epoch's order before the pipeline is restarted
            self.source.reset(self.sampler.remaining())
            self.pipe.reset()
            it = DALIGenericIterator([self.pipe], ["images", "labels"], last_batch_policy=LastBatchPolicy.DROP,
                                     auto_reset=False, prepare_first_batch=False)
        for out in it:
            x = out[0]["images"]
            if self.cast_bf16:
                x = x.to(torch.bfloat16)
            if self.in_chans != 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            yield (x, out[0]["labels"]) if self.with_labels else x
