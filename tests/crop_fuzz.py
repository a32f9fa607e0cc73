"""Random batches for the native crop-resize (cxrfast._dicom.crop_resize): valid ones must give
finite outputs, invalid boxes must raise ValueError before any native work. Run at length
under an ASan/UBSan build of the extension:

    CXRFAST_SANITIZE=1 pip install --no-build-isolation -e .
    LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \\
        ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1 \\
        python tests/crop_fuzz.py --seconds 300 --seed 1

A crash, a sanitizer report or a non-finite output is a finding.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cxrfast import _dicom


def random_batch(rng: np.random.Generator):
    """Images of 1-69 rows/columns in uint8/uint16/float32 (some with padded rows), valid boxes."""
    count = int(rng.integers(1, 5))
    dtype = [np.uint8, np.uint16, np.float32][int(rng.integers(3))]
    images, boxes = [], []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        pad = int(rng.integers(0, 4))
        full = (rng.random((h, w + pad)) * 255).astype(dtype)
        images.append(full[:, :w] if rng.integers(2) else full[:, pad:])
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        boxes.append([int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw])
    return images, np.array(boxes, np.int64), rng.integers(0, 2, count).astype(bool)


def run(seconds: float, seed: int) -> int:
    rng = np.random.default_rng(seed)
    end, cases = time.time() + seconds, 0
    while time.time() < end:
        images, boxes, mirror = random_batch(rng)
        size = int(rng.integers(1, 80))
        out = np.empty((len(images), size, size), np.float32)
        _dicom.crop_resize(images, boxes, mirror, out, 1.0, 0.0, int(rng.integers(1, 4)))
        if not np.isfinite(out).all():
            raise AssertionError(f"non-finite output (seed {seed}, case {cases})")
        bad = boxes.copy()
        bad[0, int(rng.integers(4))] += int(rng.integers(1, 100)) * (1 if rng.integers(2) else -1)
        inside = (bad[0, 0] >= 0 and bad[0, 1] >= 0 and bad[0, 2] >= 1 and bad[0, 3] >= 1
                  and bad[0, 0] + bad[0, 2] <= images[0].shape[0] and bad[0, 1] + bad[0, 3] <= images[0].shape[1])
        try:
            _dicom.crop_resize(images, bad, mirror, out, 1.0, 0.0, 1)
        except ValueError:
            if inside:
                raise
        else:
            if not inside:
                raise AssertionError(f"box {bad[0].tolist()} outside {images[0].shape} was accepted")
        cases += 1
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run")
    parser.add_argument("--seed", type=int, default=0, help="random seed (cases are reproducible)")
    args = parser.parse_args()
    print(f"{run(args.seconds, args.seed)} batches, no finding")


if __name__ == "__main__":
    main()
