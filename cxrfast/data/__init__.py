"""Datasets and loaders: file lists, label tables, patient splits, direct-from-file loading,
and :func:`loader` (``cxrfast.data.loader(prepared_folder, batch_size=...)``), the batches of
a prepared folder in one call. ``loader`` and ``ResumableSampler`` are imported on first use:
they need torch, which preparing a dataset does not (its import is seconds per process)."""
from .files import IMAGE_SUFFIXES, find_images, load_image
from .labels import LabelTable, read_labels
from .splits import patient_split

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_image", "LabelTable", "read_labels", "ResumableSampler",
           "patient_split", "loader"]


def __getattr__(name: str):
    """``loader`` and ``ResumableSampler`` on first use: torch and the loaders' backends (DALI,
    the GPU path) stay unimported until then."""
    if name == "loader":
        from .loaders import loader

        return loader
    if name == "ResumableSampler":
        from .sampler import ResumableSampler

        return ResumableSampler
    raise AttributeError(f"module 'cxrfast.data' has no attribute {name!r}")
