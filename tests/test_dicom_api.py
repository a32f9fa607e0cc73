"""The Python API: read / read_header / read_many / encapsulated_frames and their errors."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cxrfast import dicom
from dicom_factory import make_dicom, make_encapsulated


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng()
    paths, arrays = [], []
    for i in range(9):
        a = rng.integers(0, 4096, size=(30 + i, 20 + 2 * i)).astype(np.uint16)
        p = tmp_path / f"img{i}.dcm"
        p.write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096)))
        paths.append(p)
        arrays.append(a)
    return paths, arrays


def test_read_path_and_bytes_agree(files):
    paths, arrays = files
    a = dicom.read(paths[0], output="stored")
    b = dicom.read(paths[0].read_bytes(), output="stored")
    np.testing.assert_array_equal(a.pixels, arrays[0])
    np.testing.assert_array_equal(b.pixels, arrays[0])
    assert a.meta["sop_instance_uid"] == b.meta["sop_instance_uid"]
    for key in ["rows", "columns", "bits_stored", "photometric", "transfer_syntax", "rescale", "window",
                "view_position", "patient_id", "study_instance_uid", "series_instance_uid",
                "sop_instance_uid", "pixel_spacing", "number_of_frames"]:
        assert key in a.meta


def test_read_many_matches_read_in_order(files):
    paths, arrays = files
    many = dicom.read_many(paths, num_threads=2, output="stored")
    for img, a in zip(many, arrays):
        np.testing.assert_array_equal(img.pixels, a)
    shown = dicom.read_many(paths, num_threads=3, size=16, dtype="float32")
    for img, p in zip(shown, paths):
        np.testing.assert_array_equal(img.pixels, dicom.read(p, size=16, dtype="float32").pixels)


def test_read_many_skip_and_raise(files, tmp_path):
    paths, _ = files
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(paths[0].read_bytes()[:400])
    mixed = [paths[0], bad, tmp_path / "absent.dcm", paths[1]]
    out = dicom.read_many(mixed, on_error="skip")
    assert isinstance(out[0], dicom.DicomImage) and isinstance(out[3], dicom.DicomImage)
    assert isinstance(out[1], dicom.TruncatedError) and "bad.dcm" in str(out[1])
    assert isinstance(out[2], dicom.DicomReadError) and "absent.dcm" in str(out[2])
    with pytest.raises(dicom.TruncatedError, match="bad.dcm"):
        dicom.read_many(mixed)


def test_read_many_library_codec_files(tmp_path):
    import imagecodecs

    a = np.random.default_rng().integers(0, 4096, (16, 20)).astype(np.uint16)
    p = tmp_path / "jls.dcm"
    p.write_bytes(make_encapsulated([imagecodecs.jpegls_encode(a)], transfer_syntax="1.2.840.10008.1.2.4.80",
                                    rows=16, columns=20, bits_stored=12))
    (img,) = dicom.read_many([p], output="stored")
    np.testing.assert_array_equal(img.pixels, a)


def test_read_many_releases_the_gil(tmp_path):
    """While one read_many call decodes in native threads, a Python thread keeps running."""
    a = np.random.default_rng().integers(0, 4096, size=(512, 512)).astype(np.uint16)
    p = tmp_path / "big.dcm"
    p.write_bytes(make_dicom(a, bits_stored=12))
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        time.sleep(0.01)
        t0 = time.perf_counter()
        dicom.read_many([p] * 300, num_threads=1, size=(300, 300))  # leaves the other core to the ticker
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join()
    during = [x for x in ticks if t0 < x < t1]
    # Held GIL: no tick inside the native part (a few at most in the Python around it, one per
    # 5 ms switch interval). Released: about one per millisecond; a loaded machine still gives
    # far more than one per 20 ms.
    assert len(during) >= max(5, (t1 - t0) * 1000 / 20)


def test_encapsulated_frames_are_zero_copy():
    import imagecodecs

    frames = [imagecodecs.jpeg8_encode(np.full((8, 8), k, np.uint8), lossless=True, predictor=1) for k in range(3)]
    data = make_encapsulated(frames, transfer_syntax="1.2.840.10008.1.2.4.70", rows=8, columns=8,
                             bits_allocated=8, bits_stored=8)
    enc = dicom.encapsulated_frames(data)
    assert enc.codec == "jpeg_lossless" and len(enc.frames) == 3
    assert all(f.obj is data for f in enc.frames)  # views into the caller's bytes


def test_argument_errors(files):
    paths, _ = files
    with pytest.raises(ValueError, match="output"):
        dicom.read(paths[0], output="raw")
    with pytest.raises(ValueError, match="dtype"):
        dicom.read(paths[0], dtype="int8")
    with pytest.raises(ValueError, match="size"):
        dicom.read(paths[0], size=0)
    with pytest.raises(dicom.InvalidDicomError, match="frame"):
        dicom.read(paths[0], frame=3)
    with pytest.raises(TypeError):
        dicom.read_many(paths, colour=True)


def test_multiframe_frame_selection():
    rng = np.random.default_rng()
    a = rng.integers(0, 255, size=(4, 6, 5)).astype(np.uint8)
    data = make_dicom(a, bits_stored=8)
    assert dicom.read(data, output="stored").pixels.shape == (4, 6, 5)
    np.testing.assert_array_equal(dicom.read(data, output="stored", frame=2).pixels, a[2])
    assert dicom.read(data, size=10).pixels.shape == (4, 10, 8)


def test_error_hierarchy():
    for cls in [dicom.InvalidDicomError, dicom.TruncatedError, dicom.UnsupportedTransferSyntaxError,
                dicom.CorruptCodestreamError, dicom.NoPixelDataError, dicom.MissingCodecError,
                dicom.UnsupportedFeatureError, dicom.DicomReadError]:
        assert issubclass(cls, dicom.DicomError)
