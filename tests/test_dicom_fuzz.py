"""Bounded fuzzing in CI: mutated and truncated files decode or raise DicomError, never crash."""
import os

from dicom_fuzz import run


def test_mutated_inputs_decode_or_raise_dicom_error():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"fuzz seed {seed}")
    counts = run(count=1500, seconds=None, seed=seed)
    assert sum(counts.values()) == 1500
    assert len(counts) > 1  # the mutations reach both outcomes


def test_every_truncation_of_every_seed():
    from dicom_fuzz import exercise, hostile_seeds, valid_seeds

    for data in valid_seeds():
        for n in range(0, len(data), max(1, len(data) // 97)):
            exercise(data[:n])
        assert exercise(data) == "ok"
    for data in hostile_seeds():  # each fails cleanly, and so does every truncation of it
        for n in range(0, len(data), max(1, len(data) // 97)):
            exercise(data[:n])
        assert exercise(data) == "InvalidDicomError"
