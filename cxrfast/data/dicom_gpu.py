"""The direct-DICOM GPU path, for fine-tuning on hospital data that was never prepared.

Frames in JPEG lossless SV1, JPEG baseline/extended and JPEG 2000 go, as their compressed
bitstreams (``cxrfast.dicom.encapsulated_frames``), to DALI's GPU image decoder
(``device="mixed"``, 16-bit output); every other transfer syntax is decoded on the CPU by
``cxrfast.dicom``. The display pipeline (modality LUT, VOI, MONOCHROME1) then runs on the
device as a lookup into ``cxrfast.dicom.display_lut`` - the very table the CPU path uses, so
the numbers are the CPU path's - followed by an antialiased resize.

Without CUDA or DALI everything is decoded on the CPU and the same device code runs on CPU
tensors (how the tests check it).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import dicom
from . import dali

log = logging.getLogger(__name__)
GPU_SYNTAXES = {"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


class _DaliDecoder:
    """A reusable mixed-device decoding pipeline fed with encoded frames."""

    def __init__(self, device_id: int, batch_size: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        self.batch: list[np.ndarray] = []

        @pipeline_def(batch_size=batch_size, num_threads=4, device_id=device_id, exec_dynamic=True)
        def pipe():
            encoded = fn.external_source(source=lambda: self.batch, batch=True, dtype=types.UINT8)
            return fn.decoders.image(encoded, device="mixed", output_type=types.ANY_DATA, dtype=types.UINT16)

        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, frames: list[bytes], device: torch.device) -> list[torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        self.batch = [np.frombuffer(f, np.uint8) for f in frames]
        (out,) = self.pipe.run()
        tensors = []
        for i in range(len(frames)):
            sample = out[i]
            t = torch.empty(sample.shape(), dtype=torch.int16, device=device)  # same bytes as uint16
            feed_ndarray(sample, t, cuda_stream=torch.cuda.current_stream(device))
            tensors.append(t.view(torch.uint16) if hasattr(torch, "uint16") else t)
        return tensors


class DicomReader:
    """paths -> display-ready float32 (H, W) tensors in [0, 1] on ``device``."""

    def __init__(self, device: str | torch.device = "cuda", size: int | tuple[int, int] | None = None,
                 use_dali: bool | None = None, batch_size: int = 16):
        self.device = torch.device(device)
        self.size = size
        if use_dali is None:
            use_dali = self.device.type == "cuda" and dali.available()
        self.use_dali = use_dali
        self.batch_size = batch_size
        self._decoder: _DaliDecoder | None = None
        self._luts: dict = {}

    def _gpu_frames(self, paths: Sequence[str]) -> dict[int, torch.Tensor]:
        """Decodes what DALI can; returns {position: raw sample words (H, W) on the device}."""
        if not self.use_dali:
            return {}
        chosen, frames = [], []
        for k, p in enumerate(paths):
            try:
                meta = dicom.read_header(p)
            except dicom.DicomError:
                continue
            if meta["transfer_syntax"] in GPU_SYNTAXES and meta["samples_per_pixel"] == 1:
                enc = dicom.encapsulated_frames(p)
                chosen.append(k)
                frames.append(bytes(enc.frames[0]))
        if not frames:
            return {}
        try:
            if self._decoder is None:
                self._decoder = _DaliDecoder(self.device.index or 0, self.batch_size)
            out = {}
            for start in range(0, len(frames), self.batch_size):
                decoded = self._decoder(frames[start:start + self.batch_size], self.device)
                for k, t in zip(chosen[start:start + self.batch_size], decoded):
                    out[k] = t.reshape(t.shape[0], t.shape[1]) if t.ndim == 3 else t
            return out
        except Exception as exc:  # a DALI/nvImageCodec limitation: fall back to the CPU decoder
            log.warning("GPU decoding failed (%s); decoding on the CPU instead", exc)
            self.use_dali = False
            return {}

    def __call__(self, paths: Sequence[str]) -> list[torch.Tensor]:
        paths = [str(p) for p in paths]
        gpu = self._gpu_frames(paths)
        out = []
        for k, p in enumerate(paths):
            if k in gpu:
                raw, shifted = gpu[k].to(torch.int32), False
            else:  # stored values, already masked, shifted and sign-extended
                stored = dicom.read(p, output="stored", frame=0)
                raw, shifted = torch.from_numpy(stored.pixels.astype(np.int32)).to(self.device), True
            out.append(self.display(p, raw, shifted))
        return out

    def display(self, path: str, raw: torch.Tensor, shifted: bool) -> torch.Tensor:
        """Stored samples -> display values on the device, through the CPU path's own LUT."""
        lut, shift, mask = dicom.display_lut(path, (0, 0))  # the range is ignored when a window is given
        if dicom.needs_value_range(path):  # no window: the table depends on the image's min/max
            meta = dicom.read_header(path)
            bits, signed = meta["bits_stored"], meta["pixel_representation"] == 1
            v = raw if shifted else (raw >> shift) & mask
            if signed and not shifted:
                v = torch.where(v >= 1 << (bits - 1), v - (1 << bits), v)
            lut, _, _ = dicom.display_lut(path, (int(v.min()), int(v.max())))  # host-device sync
        table = torch.from_numpy(lut).to(self.device)
        index = (raw & mask) if shifted else (raw >> shift) & mask
        img = table[index.long()]
        if self.size is not None:
            h, w = img.shape
            if isinstance(self.size, int):
                s = self.size / max(h, w)
                target = (max(1, round(h * s)), max(1, round(w * s)))
            else:
                target = tuple(self.size)
            img = F.interpolate(img[None, None], size=target, mode="bilinear", antialias=True, align_corners=False)[0, 0]
        return img
