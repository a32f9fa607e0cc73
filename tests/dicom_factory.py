"""Builds test DICOM files with pydicom (an independent writer), in memory."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"


def base_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bits = bits_stored or pixels.dtype.itemsize * 8
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    frames = pixels.ndim - (2 if samples == 1 else 3)
    ds.Rows, ds.Columns = pixels.shape[frames : frames + 2]
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OB" if pixels.dtype.itemsize == 1 else "OW"
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CR_SOP_CLASS
    ds.file_meta.MediaStorageSOPClassUID = CR_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "P001"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.PixelSpacing = [0.143, 0.143]
    return ds


def lut_item(first: int, bits: int, data: np.ndarray, packed8: bool = True) -> Dataset:
    """A LUT item; 8-bit data are packed one entry per byte (PS3.3 C.11.1.1.1) unless not packed8."""
    item = Dataset()
    item.LUTDescriptor = [len(data) % 65536, first, bits]
    item["LUTDescriptor"].VR = "US"
    if bits == 8 and packed8:
        item.LUTData = np.asarray(data, np.uint8).tobytes()
        item["LUTData"].VR = "OW"
    else:
        item.LUTData = [int(v) for v in data]
        item["LUTData"].VR = "US"
    return item


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    rescale: tuple[float, float] | None = None,
    voi_lut: Dataset | None = None,
    modality_lut: Dataset | None = None,
    presentation_lut_shape: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A native-pixel DICOM file as bytes, in the given (uncompressed) transfer syntax."""
    ds = base_dataset(pixels, photometric, bits_stored)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function:
        ds.VOILUTFunction = voi_function
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        ds.VOILUTSequence = Sequence([voi_lut])
    if modality_lut is not None:
        ds.ModalityLUTSequence = Sequence([modality_lut])
    if presentation_lut_shape:
        ds.PresentationLUTShape = presentation_lut_shape
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    return write(ds, transfer_syntax)


def write(ds: Dataset, transfer_syntax: str) -> bytes:
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    if ts == "1.2.840.10008.1.2.2" and "PixelData" in ds and ds.BitsAllocated > 8:
        # pydicom writes the pixel bytes as given; big endian wants words byte-swapped (PS3.5 7.3).
        ds = ds.copy()
        word = np.dtype(f">u{ds.BitsAllocated // 8}")
        ds.PixelData = np.frombuffer(ds.PixelData, word.newbyteorder("<")).astype(word).tobytes()
    little = ts != "1.2.840.10008.1.2.2"
    implicit = ts == "1.2.840.10008.1.2"
    ds.save_as(buf, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    return buf.getvalue()


def make_encapsulated(
    frames: list[bytes],
    *,
    transfer_syntax: str,
    rows: int,
    columns: int,
    bits_allocated: int = 16,
    bits_stored: int = 16,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    layout: str = "bot",
    fragments_per_frame: int = 1,
) -> bytes:
    """An encapsulated DICOM file; layout: 'bot' (Basic Offset Table), 'empty' (no BOT) or 'eot'."""
    ds = base_dataset(np.zeros((rows, columns), np.uint16 if bits_allocated > 8 else np.uint8), photometric, bits_stored)
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.NumberOfFrames = len(frames)
    if layout == "eot":
        data, offsets, lengths = encapsulate_extended(frames)
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=layout == "bot")
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return write(ds, transfer_syntax)
