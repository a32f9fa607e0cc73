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
    from dicom_fuzz import exercise, hostile_cases, valid_seeds

    for data in valid_seeds():
        for n in range(0, len(data), max(1, len(data) // 97)):
            exercise(data[:n])
        assert exercise(data) == "ok"
    for name, data, expected in hostile_cases():  # each ends as expected, every truncation cleanly
        for n in range(0, len(data), max(1, len(data) // 97)):
            exercise(data[:n])
        assert exercise(data) == expected, name


def test_hostile_seeds_cover_issue_9():
    """The seeds the review asked for: non-finite VOI and rescale values read without NaN
    pixels (exercise checks the outputs), the 65535x65535 JPEG is refused."""
    from dicom_fuzz import hostile_cases, hostile_seeds

    cases = {name: expected for name, _, expected in hostile_cases()}
    for what in ("window-center", "window-width", "rescale-slope", "rescale-intercept"):
        for bad in ("NaN", "inf", "-inf"):
            assert cases[f"{what}-{bad}"] == "ok"
    assert cases["jpeg-sof-65535"] == "CorruptCodestreamError"
    assert len(hostile_seeds()) == len(cases)
