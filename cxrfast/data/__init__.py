"""Datasets and loaders: file lists, label tables, patient splits, direct-from-file loading."""
from .files import IMAGE_SUFFIXES, find_images, load_image
from .labels import LabelTable, read_labels
from .sampler import ResumableSampler
from .splits import patient_split

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_image", "LabelTable", "read_labels", "ResumableSampler",
           "patient_split"]
