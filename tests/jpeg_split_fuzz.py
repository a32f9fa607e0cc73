"""Random JPEG lossless codestreams, many of them damaged, decoded by one thread and by two
threads split at a random bit: the two must give the same image or raise the same error.
Run at length under an ASan/UBSan build of the extension:

    CXRFAST_SANITIZE=1 python setup.py build_ext --inplace
    PYTHONPATH=. LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \\
        ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1 \\
        python tests/jpeg_split_fuzz.py --seconds 600 --seed 1

A crash, a sanitizer report, a hang or a disagreement is a finding; the input is saved.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from cxrfast import _dicom  # noqa: E402
from jpeg_lossless_writer import encode  # noqa: E402


def random_stream(rng: np.random.Generator) -> bytes:
    """A smooth or noisy image of 1-80 x 1-120 samples, any predictor and precision, then
    (mostly) damaged: bit flips, a cut, or a marker put into the scan."""
    bits = int(rng.integers(2, 17))
    h, w = (int(v) for v in rng.integers(1, (80, 120)))
    if rng.integers(2):
        a = rng.integers(0, 1 << bits, size=(h, w))
    else:
        a = np.cumsum(np.cumsum(rng.integers(-3, 4, size=(h, w)), 0), 1) % (1 << bits)
    s = bytearray(encode(a.astype(np.uint16), predictor=int(rng.integers(1, 8)), precision=bits))
    start = s.index(b"\xff\xda") + 10
    kind = int(rng.integers(4))
    if kind == 1:
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(start, len(s)))
            s[i] ^= 1 << int(rng.integers(8))
    elif kind == 2:
        s = s[: int(rng.integers(start, len(s)))]
    elif kind == 3:
        i = int(rng.integers(start, len(s)))
        s[i:i] = [b"\xff\xd0", b"\xff\xd9", b"\xff\xff", b"\xff"][int(rng.integers(4))]
    return bytes(s)


def outcome(stream: bytes, **kw):
    try:
        return ("image", _dicom.jpeg_lossless_decode(stream, **kw))
    except _dicom.NativeError as exc:
        return ("error", exc.args)


def run(seconds: float | None, seed: int, out_dir: str, count: int | None = None, keep_current: bool = False) -> int:
    """Streams until `seconds` pass or `count` are done; 1 at the first finding, else 0.
    keep_current: write each stream to out_dir/jpeg_split_current.jpg before decoding it, so that
    a crash or a sanitizer's halt leaves the input behind."""
    rng = np.random.default_rng(seed)
    end, cases = time.time() + (seconds if seconds is not None else float("inf")), 0
    while time.time() < end and (count is None or cases < count):
        stream = random_stream(rng)
        if keep_current:
            with open(os.path.join(out_dir, "jpeg_split_current.jpg"), "wb") as f:
                f.write(stream)
        one = outcome(stream)
        bits = max(1, 8 * (len(stream) - stream.index(b"\xff\xda") - 10))
        for split in rng.integers(0, bits, size=4):
            two = outcome(stream, threads=2, split_bit=int(split))
            same = one[0] == two[0] and (np.array_equal(one[1], two[1]) if one[0] == "image" else one[1] == two[1])
            if not same:
                path = os.path.join(out_dir, f"jpeg_split_{seed}_{cases}_{int(split)}.jpg")
                with open(path, "wb") as f:
                    f.write(stream)
                print(f"finding: split bit {int(split)}: one thread {one[0]}, two threads {two[0]}; saved {path}")
                return 1
        cases += 1
    print(f"{cases} streams, 4 splits each: no finding")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="where a finding's stream is saved (and the stream being decoded)")
    args = p.parse_args()
    return run(args.seconds, args.seed, args.out, keep_current=True)


if __name__ == "__main__":
    sys.exit(main())
