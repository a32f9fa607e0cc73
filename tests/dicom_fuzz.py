"""A mutation fuzzer for cxrfast.dicom: every input must decode or raise DicomError.

Used twice: bounded inside the test suite (test_dicom_fuzz.py) and at length from the
command line, e.g. under an ASan/UBSan build of the extension:

    CXRFAST_SANITIZE=1 python setup.py build_ext --inplace   # ASan + UBSan + float-cast-overflow
    PYTHONPATH=. LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \\
        ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \\
        python tests/dicom_fuzz.py --seconds 600

(PYTHONPATH=. makes the script import this checkout's cxrfast, not an installed one.)

A crash, a hang or any exception other than DicomError is a finding; the input is saved.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from cxrfast import dicom  # noqa: E402


def seed_corpus() -> list[bytes]:
    """Small valid files covering every parser and decoder path, then the hostile seeds."""
    return valid_seeds() + hostile_seeds()


def valid_seeds() -> list[bytes]:
    """Small valid files covering every parser and decoder path (each reads as "ok")."""
    import imagecodecs
    from pydicom.uid import RLELossless

    from dicom_factory import (
        base_dataset,
        float_file,
        lut_item,
        make_dicom,
        make_encapsulated,
        one_bit_file,
        rle_many_frames,
        write,
    )
    from jpeg_lossless_writer import encode

    rng = np.random.default_rng(0)
    a = rng.integers(0, 4096, size=(24, 20)).astype(np.uint16)
    corpus = [
        make_dicom(a, bits_stored=12, window=(2000, 3000), rescale=(1.0, -1024.0)),
        make_dicom(a, bits_stored=12, transfer_syntax="1.2.840.10008.1.2"),
        # above 64 KiB: read by path, the pixel words are masked chunk by chunk while read
        make_dicom(rng.integers(-2048, 2048, size=(2, 150, 130)).astype(np.int16), bits_stored=12),
        make_dicom(a, bits_stored=12, transfer_syntax="1.2.840.10008.1.2.2", photometric="MONOCHROME1"),
        make_dicom(a, bits_stored=12, transfer_syntax="1.2.840.10008.1.2.1.99"),
        make_dicom(a, bits_stored=12, voi_lut=lut_item(0, 16, np.arange(4096)),
                   modality_lut=lut_item(0, 16, np.arange(4096)[::-1])),
        make_dicom(rng.integers(0, 255, (3, 8, 9, 3)).astype(np.uint8), photometric="RGB"),
        make_encapsulated([encode(a, predictor=4, precision=12, restart=40)] * 2,
                          transfer_syntax="1.2.840.10008.1.2.4.57", rows=24, columns=20, bits_stored=12),
        make_encapsulated([imagecodecs.jpeg8_encode(a, lossless=True, predictor=1, bitspersample=12)] * 2,
                          transfer_syntax="1.2.840.10008.1.2.4.70", rows=24, columns=20, bits_stored=12,
                          layout="empty", fragments_per_frame=2),
    ]
    ds = base_dataset(a, "MONOCHROME2", 12)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    corpus.append(write(ds, RLELossless))
    corpus += [
        rle_many_frames(300),
        float_file(rng.standard_normal((2, 5, 7)).astype(np.float32), "1.2.840.10008.1.2.1"),
        float_file(rng.standard_normal((5, 7)), "1.2.840.10008.1.2.2"),
        one_bit_file(rng.integers(0, 2, (3, 5, 7)).astype(np.uint8)),
    ]
    return corpus


def hostile_seeds() -> list[bytes]:
    """Files that must fail cleanly or read without NaN pixels (see hostile_cases)."""
    return [data for _, data, _ in hostile_cases()]


def hostile_cases() -> list[tuple[str, bytes, str]]:
    """(name, file, expected outcome of exercise: "ok" or the DicomError class name).

    The hostile cases of issue 9 (the offset table of many fragments, float and 1-bit data
    are valid seeds above): a deflate bomb (2 MiB of zeros in a ~3 KB file, past the
    inflation budget), a Number of Frames that is not finite, a PNG, a ZIP, non-finite
    Window Center / Width and Rescale Slope / Intercept (ignored like absent ones: the file
    reads, without NaN pixels), and a JPEG whose SOF declares 65535x65535 under a 16x16
    header (refused before any library sees it)."""
    import io
    import warnings
    import zipfile

    from dicom_factory import deflated_with_zeros, jpeg_declaring_more_than_header, make_dicom, number_of_frames_file

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.dcm", b"x" * 100)
    cases = [
        ("deflate-bomb", deflated_with_zeros(2 << 20), "InvalidDicomError"),
        ("frames-1e300", number_of_frames_file(b"1e300"), "InvalidDicomError"),
        ("frames-nan", number_of_frames_file(b"nan"), "InvalidDicomError"),
        ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(60), "InvalidDicomError"),
        ("zip", buf.getvalue(), "InvalidDicomError"),
        ("jpeg-sof-65535", jpeg_declaring_more_than_header(65535), "CorruptCodestreamError"),
    ]
    a = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 30) % 4096
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while writing the invalid DS values
        for bad in ("NaN", "inf", "-inf"):
            cases += [
                (f"window-center-{bad}", make_dicom(a, bits_stored=12, window=(bad, 1000)), "ok"),
                (f"window-width-{bad}", make_dicom(a, bits_stored=12, window=(2000, bad)), "ok"),
                (f"rescale-slope-{bad}", make_dicom(a, bits_stored=12, rescale=(bad, -1024.0)), "ok"),
                (f"rescale-intercept-{bad}", make_dicom(a, bits_stored=12, rescale=(2.0, bad), window=(0, 4000)), "ok"),
            ]
    return cases


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = int(rng.integers(0, 6))
        i = int(rng.integers(0, max(1, len(b))))
        if op == 0 and b:  # flip bits
            b[i % len(b)] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:  # truncate
            del b[i:]
        elif op == 2:  # random bytes
            n = int(rng.integers(1, 9))
            b[i:i + n] = rng.integers(0, 256, n).astype(np.uint8).tobytes()
        elif op == 3:  # a hostile 16- or 32-bit value (lengths, rows, offsets)
            v = int(rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFE, int(rng.integers(0, 2**32))]))
            b[i:i + 4] = v.to_bytes(4, "little")
        elif op == 4:  # delete a chunk
            del b[i:i + int(rng.integers(1, 64))]
        else:  # duplicate a chunk
            j = int(rng.integers(0, max(1, len(b))))
            b[i:i] = b[j:j + int(rng.integers(1, 64))]
    return bytes(b)


def exercise(data: bytes) -> str:
    """Runs every entry point on one input; returns 'ok' or the DicomError class name."""
    outcome = "ok"
    def display() -> None:  # display output is never NaN or infinite, whatever the header says
        if not np.isfinite(dicom.read(data, size=16, dtype="float32").pixels).all():
            raise AssertionError("display output with NaN or infinite pixels")

    stored_kind = []

    def stored() -> None:
        stored_kind.append(dicom.read(data, output="stored").pixels.dtype.kind)

    def stored_by_path() -> None:  # a file read by path may become its own output: same result
        with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
            f.write(data)
            f.flush()
            try:
                by_path = dicom.read(f.name, output="stored").pixels
            except dicom.DicomError as exc:
                by_path = type(exc).__name__
        try:
            by_bytes = dicom.read(data, output="stored").pixels
        except dicom.DicomError as exc:
            by_bytes = type(exc).__name__
        errors = [r for r in (by_path, by_bytes) if isinstance(r, str)]
        if errors:
            if len(errors) != 2 or by_path != by_bytes:
                raise AssertionError(f"stored by path and from bytes end differently: {errors}")
            return  # the same error: stored() counts it
        nan = by_path.dtype.kind == "f"  # Float Pixel Data may hold NaN
        if by_path.dtype != by_bytes.dtype or not np.array_equal(by_path, by_bytes, equal_nan=nan):
            raise AssertionError("stored values by path differ from those read from bytes")

    def modality() -> None:  # nor is the modality output of integer pixel data
        pixels = dicom.read(data, output="modality", frame=0).pixels
        if stored_kind and stored_kind[0] in "iu" and not np.isfinite(pixels).all():
            raise AssertionError("modality output of integer pixel data with NaN or infinite pixels")

    calls = [stored, stored_by_path, display, modality]
    if len(data) >= 2:  # a strided view must be refused, never read
        try:
            dicom.read(memoryview(data)[::-1])
            raise AssertionError("a reversed buffer was read")
        except ValueError:
            pass
    try:
        if dicom.read_header(data)["codec"] != "native":
            calls.append(lambda: dicom.encapsulated_frames(data))
    except dicom.DicomError as exc:
        outcome = type(exc).__name__
    for call in calls:
        try:
            call()
        except dicom.DicomError as exc:
            outcome = type(exc).__name__
    return outcome


def run(count: int | None, seconds: float | None, seed: int, save_dir: str | None = None) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    corpus = seed_corpus()
    counts: dict[str, int] = {}
    start = time.monotonic()
    n = 0
    while (count is None or n < count) and (seconds is None or time.monotonic() - start < seconds):
        data = mutate(corpus[n % len(corpus)], rng)
        try:
            outcome = exercise(data)
        except Exception:
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
                with open(os.path.join(save_dir, f"finding-{seed}-{n}.dcm"), "wb") as f:
                    f.write(data)
            raise
        counts[outcome] = counts.get(outcome, 0) + 1
        n += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    parser.add_argument("--save", default="fuzz-findings", help="folder for inputs that fail")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    counts = run(None, args.seconds, seed, args.save)
    total = sum(counts.values())
    print(f"seed {seed}: {total} inputs in {args.seconds:.0f} s, no crash; outcomes: {counts}")


if __name__ == "__main__":
    main()
