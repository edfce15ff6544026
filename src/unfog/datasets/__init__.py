"""Data sets at the edge of unfog: files and third-party data in, tensors in [-1, 1] out."""

from unfog.datasets.digits import DigitsDataset, digits_tensors, split_indices
from unfog.datasets.folder import EXTENSIONS, ImageFolderDataset, SkippedFile

__all__ = [
    "DigitsDataset",
    "EXTENSIONS",
    "ImageFolderDataset",
    "SkippedFile",
    "digits_tensors",
    "split_indices",
]
