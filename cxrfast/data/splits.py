"""Patient-level train/val/test splits: every image of a patient lands in the same split."""
from __future__ import annotations

import hashlib


def patient_split(patients: list[str], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                  salt: str = "cxrfast") -> list[str]:
    """Assigns 'train', 'val' or 'test' to each item by a hash of its patient id, so the
    split is stable across runs, machines and dataset growth."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    out = []
    for p in patients:
        h = int.from_bytes(hashlib.sha256(f"{salt}:{p}".encode()).digest()[:8], "big") / 2**64
        out.append("train" if h < fractions[0] else "val" if h < fractions[0] + fractions[1] else "test")
    return out
