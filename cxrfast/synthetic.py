"""Synthetic chest-radiograph-like images and the demo DICOM dataset built from them.

The demo needs data without downloads: images with the structures a CXR model sees (lung
fields, mediastinum, ribs, clavicles, noise) and labels tied to visible findings, written as
DICOM in the transfer syntaxes real archives use (native, RLE, JPEG lossless SV1), in both
MONOCHROME1 and MONOCHROME2. They are made with pydicom and imagecodecs, not with our
reader, so reading them back tests the reader too.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_open, atomic_path

FINDINGS = ("Effusion", "Nodule", "Cardiomegaly")


def chest_image(rng: np.random.Generator, size: int = 256, findings: dict[str, bool] | None = None) -> np.ndarray:
    """A 12-bit (0-4095) image where higher means more attenuation (bone is high)."""
    findings = findings or {}
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 8 + ((y - 0.55) / 0.55) ** 8))
    img = 900 + 1800 * body
    heart_w = 0.16 if findings.get("Cardiomegaly") else 0.1
    for cx in (0.3 + rng.normal(0, 0.01), 0.7 + rng.normal(0, 0.01)):
        lung = ((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        img = np.where(lung, img - 1300, img)
    img += 1500 * np.exp(-(((x - 0.5) / 0.06) ** 2))  # mediastinum and spine
    img += 1100 * np.exp(-(((x - 0.53) / heart_w) ** 2 + ((y - 0.68) / 0.13) ** 2))  # heart
    for k in range(9):  # ribs: bright arcs
        yy = 0.22 + 0.07 * k + 0.08 * (x - 0.5) ** 2 + rng.normal(0, 0.004)
        img += 420 * np.exp(-(((y - yy) / 0.012) ** 2)) * body
    for side in (-1, 1):  # clavicles
        img += 600 * np.exp(-(((y - 0.17 - 0.1 * np.abs(x - 0.5)) / 0.015) ** 2)) * (np.abs(x - 0.5 - side * 0.18) < 0.17)
    if findings.get("Effusion"):
        img += 1100 * (y > 0.68 + 0.05 * rng.random()) * (np.abs(x - 0.3) < 0.15)
    if findings.get("Nodule"):
        nx, ny = rng.uniform(0.2, 0.4), rng.uniform(0.35, 0.6)
        img += 900 * np.exp(-(((x - nx) ** 2 + (y - ny) ** 2) / 0.0009))
    img += rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70")


def write_dicom(path: Path, pixels: np.ndarray, *, transfer_syntax: str, monochrome1: bool, patient_id: str,
                view: str = "PA") -> None:
    """Writes a CR image; MONOCHROME1 files store inverted values (low = dense), as CR plates do."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, generate_uid

    stored = (4095 - pixels) if monochrome1 else pixels
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.ViewPosition = view
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ts = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = ts
    if ts == "1.2.840.10008.1.2.4.70":
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=12)])
        ds["PixelData"].VR = "OB"
    elif ts == "1.2.840.10008.1.2.5":
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.compress(ts, encoding_plugin="pydicom")
    else:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
    with atomic_path(path) as tmp:  # a file appears only when complete
        ds.save_as(tmp, enforce_file_format=True)


def ensure_demo_dataset(folder: str | os.PathLike, count: int = 96, size: int = 256, seed: int = 0) -> Path:
    """Creates (once) ``count`` demo DICOM files and ``labels.csv`` under ``folder``.

    Labels are in the generic ``path,<label columns>`` format; patients have 2 images each,
    so patient-level splits are meaningful. Returns the folder.
    """
    root = Path(folder)
    labels = root / "labels.csv"
    if labels.exists():
        with open(labels) as f:
            if sum(1 for _ in f) == count + 1:
                return root  # made before with the same count
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        findings = {name: bool(rng.random() < 0.4) for name in FINDINGS}
        ts = TRANSFER_SYNTAXES[i % len(TRANSFER_SYNTAXES)]
        name = f"cxr_{i:03d}.dcm"
        write_dicom(root / name, chest_image(rng, size, findings), transfer_syntax=ts,
                    monochrome1=bool(i % 2), patient_id=f"DEMO{i // 2:03d}", view="PA" if i % 4 else "AP")
        rows.append([name] + [int(findings[f]) for f in FINDINGS])
    with atomic_open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *FINDINGS])
        writer.writerows(rows)
    return root
