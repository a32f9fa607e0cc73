"""Datasets and loaders: file lists, label tables, patient splits, direct-from-file loading,
and :func:`loader` (``cxrfast.data.loader(prepared_folder, batch_size=...)``), the batches of
a prepared folder in one call (imported on first use)."""
from .files import IMAGE_SUFFIXES, find_images, load_image
from .labels import LabelTable, read_labels
from .sampler import ResumableSampler
from .splits import patient_split

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_image", "LabelTable", "read_labels", "ResumableSampler",
           "patient_split", "loader"]


def __getattr__(name: str):
    """``loader`` on first use: its backends (DALI, the GPU path) stay unimported until then."""
    if name == "loader":
        from .loaders import loader

        return loader
    raise AttributeError(f"module 'cxrfast.data' has no attribute {name!r}")
