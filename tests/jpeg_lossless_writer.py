"""A small, slow, test-only JPEG lossless (SOF3) encoder.

It writes what no installed tool can: restart intervals of any length (imagecodecs and
Debian's dcmcjpeg write none), forced SSSS=16 differences and any precision 2-16 with a
point transform. It is independent of the decoder under test: it works from T.81 Annex H
directly, one sample at a time.
"""
from __future__ import annotations

import heapq

import numpy as np


def _predict(p: int, ra: int, rb: int, rc: int) -> int:
    return {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 5: ra + ((rb - rc) >> 1),
            6: rb + ((ra - rc) >> 1), 7: (ra + rb) >> 1}[p]


def differences(x: np.ndarray, predictor: int, precision: int, pt: int, restart: int) -> list[int]:
    """Signed differences in raster order, with prediction reset at each restart interval."""
    h, w = x.shape
    x = x.astype(np.int64)
    out = []
    interval_start = 0
    first_row_end = 0
    for i in range(h * w):
        r, c = divmod(i, w)
        if restart and i % restart == 0:
            interval_start = i
        if i == interval_start:
            pred = 1 << (precision - pt - 1)
            first_row_end = (i // w + 1) * w
        elif i < first_row_end:
            pred = int(x[r, c - 1])
        elif c == 0:
            pred = int(x[r - 1, 0])
        else:
            pred = _predict(predictor, int(x[r, c - 1]), int(x[r - 1, c]), int(x[r - 1, c - 1]))
        d = (int(x[r, c]) - pred) & 0xFFFF
        out.append(d - 65536 if d > 32768 else d)
    return out


def _category(d: int) -> int:
    return 16 if d == 32768 else abs(d).bit_length()


def _code_lengths(freq: dict[int, int]) -> dict[int, int]:
    symbols = sorted(freq)
    heap = [(freq[s], k, [s]) for k, s in enumerate(symbols)]
    heap.append((0, len(symbols), [-1]))  # reserve the all-ones code (T.81 K.2)
    heapq.heapify(heap)
    depth = {s: 0 for s in symbols + [-1]}
    k = len(heap)
    while len(heap) > 1:
        f1, _, s1 = heapq.heappop(heap)
        f2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            depth[s] += 1
        heapq.heappush(heap, (f1 + f2, k, s1 + s2))
        k += 1
    if max(depth.values()) > 16:
        return {s: 5 for s in symbols}
    depth.pop(-1)
    return {s: max(d, 1) for s, d in depth.items()}


def encode(arr: np.ndarray, *, predictor: int = 1, precision: int = 16, pt: int = 0,
           restart: int = 0) -> bytes:
    """Encodes a 2-D array of unsigned samples (< 2**precision) as one SOF3 stream."""
    assert arr.ndim == 2 and 1 <= predictor <= 7 and 2 <= precision <= 16
    h, w = arr.shape
    x = arr.astype(np.int64) >> pt
    diffs = differences(x, predictor, precision, pt, restart)
    cats = [_category(d) for d in diffs]
    freq: dict[int, int] = {}
    for s in cats:
        freq[s] = freq.get(s, 0) + 1
    lengths = _code_lengths(freq)
    order = sorted(lengths, key=lambda s: (lengths[s], s))
    codes, code, prev = {}, 0, lengths[order[0]]
    for s in order:
        code <<= lengths[s] - prev
        prev = lengths[s]
        codes[s] = (code, lengths[s])
        code += 1

    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision]) + h.to_bytes(2, "big")
    out += w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    for s in order:
        counts[lengths[s] - 1] += 1
    dht = bytes([0x00]) + bytes(counts) + bytes(order)
    out += b"\xff\xc4" + (len(dht) + 2).to_bytes(2, "big") + dht
    if restart:
        out += b"\xff\xdd" + (4).to_bytes(2, "big") + restart.to_bytes(2, "big")
    out += b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, predictor, 0, pt])

    def flush(bits: list[str]) -> bytes:
        s = "".join(bits)
        s += "1" * (-len(s) % 8)
        raw = int(s, 2).to_bytes(len(s) // 8, "big") if s else b""
        return raw.replace(b"\xff", b"\xff\x00")

    bits: list[str] = []
    for i, (d, s) in enumerate(zip(diffs, cats)):
        if restart and i and i % restart == 0:
            out += flush(bits) + bytes([0xFF, 0xD0 + ((i // restart - 1) & 7)])
            bits = []
        c, n = codes[s]
        bits.append(format(c, f"0{n}b"))
        if 0 < s < 16:
            v = d if d > 0 else d + (1 << s) - 1
            bits.append(format(v, f"0{s}b"))
    out += flush(bits) + b"\xff\xd9"
    return bytes(out)
