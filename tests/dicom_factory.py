"""Builds test DICOM files with pydicom (an independent writer), in memory."""
from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless, generate_uid

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


def float_file(a: np.ndarray, ts: str, photometric: str = "MONOCHROME2") -> bytes:
    """Float (float32) or Double Float (float64) Pixel Data, no integer pixel attributes."""
    ds = base_dataset(np.zeros(a.shape, np.uint16), photometric, 16)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = a.dtype.itemsize * 8
    raw = (a.astype(a.dtype.newbyteorder(">")) if ts == "1.2.840.10008.1.2.2" else a).tobytes()
    if a.dtype == np.float32:
        ds.FloatPixelData = raw
    else:
        ds.DoubleFloatPixelData = raw
    return write(ds, ts)


def one_bit_file(bits: np.ndarray, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Bits Allocated 1 (values 0/1), frames packed back to back in bits as pydicom packs them."""
    from pydicom.pixels import pack_bits

    ds = base_dataset(np.zeros(bits.shape, np.uint8), "MONOCHROME2", 1)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = pack_bits(bits)
    return write(ds, transfer_syntax)


def rle_many_frames(n: int) -> bytes:
    """n RLE frames of 1x1 8-bit (frame i holds i % 256), one fragment each, with a Basic Offset Table."""
    frames = [struct.pack("<II", 1, 64) + bytes(56) + bytes([0, i % 256]) for i in range(n)]
    return make_encapsulated(frames, transfer_syntax=RLELossless, rows=1, columns=1, bits_allocated=8,
                             bits_stored=8, layout="bot")


def deflate_start(data: bytes) -> int:
    """Where the deflated data set starts: after the file meta, whose group length is at 140."""
    return 144 + struct.unpack("<I", data[140:144])[0]


def deflated_with_zeros(extra_zeros: int) -> bytes:
    """A valid 16x16 deflated file whose data set holds `extra_zeros` zero bytes in a private
    element before Pixel Data: with 2 GB of zeros, a deflate bomb (~1000:1)."""
    ds = base_dataset(np.zeros((16, 16), np.uint16), "MONOCHROME2", 12)
    ds.add_new(0x00291010, "OB", b"\x00\x00")
    data = write(ds, DeflatedExplicitVRLittleEndian)
    marker = b"\x29\x00\x10\x10OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x00"
    start = deflate_start(data)
    body = zlib.decompressobj(-15).decompress(data[start:])
    head, tail = body.split(marker)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [co.compress(head + marker[:8] + struct.pack("<I", extra_zeros)), co.flush(zlib.Z_FULL_FLUSH)]
    chunk = 1 << 22
    # after a full flush the compressor forgets its history, so one compressed chunk repeats
    block = co.compress(bytes(chunk)) + co.flush(zlib.Z_FULL_FLUSH) if extra_zeros >= chunk else b""
    parts.append(block * (extra_zeros // chunk))
    parts += [co.compress(bytes(extra_zeros % chunk) + tail), co.flush()]
    return data[:start] + b"".join(parts)


def number_of_frames_file(text: bytes) -> bytes:
    """A 3x4 file whose Number of Frames reads `text` (at most 6 bytes), e.g. b"1e300", b"nan"."""
    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    data = make_dicom(a, extra={"NumberOfFrames": "123456"})
    assert data.count(b"123456") == 1
    return data.replace(b"123456", text.ljust(6))


def jpeg_declaring_more_than_header(declared: int = 65535) -> bytes:
    """A JPEG baseline file whose header says 16x16 while the frame's SOF0 declares
    declared x declared (a library would allocate for the SOF before noticing)."""
    import struct

    import imagecodecs

    stream = bytearray(imagecodecs.jpeg8_encode(np.full((16, 16), 100, np.uint8)))
    struct.pack_into(">HH", stream, stream.index(b"\xff\xc0") + 5, declared, declared)  # SOF0: Lf, P, Y, X
    return make_encapsulated([bytes(stream)], transfer_syntax="1.2.840.10008.1.2.4.50", rows=16, columns=16,
                             bits_allocated=8, bits_stored=8)
