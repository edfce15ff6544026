"""scikit-learn's 8x8 handwritten digits as a torch Dataset of (image, label).

The data (1,797 greyscale 8x8 images with values 0..16, about 180 per class) ships inside
scikit-learn, so nothing is downloaded. Images are scaled to [-1, 1] and upsampled with
bilinear interpolation to ``size`` x ``size`` (default 16).

The train / test split is stratified and fixed: for every class, a permutation drawn from
``numpy.random.default_rng(SPLIT_SEED)`` puts ``round(TEST_FRACTION * n_class)`` of its
images in ``"test"`` and the rest in ``"train"``. The same split on every machine and every
run, so a held-out accuracy or FID measured today is comparable with one measured later.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..choices import check_choice

Split = Literal["train", "test", "all"]
SPLITS: tuple[str, ...] = get_args(Split)

SPLIT_SEED = 0
TEST_FRACTION = 0.2
NUM_CLASSES = 10
NATIVE_SIZE = 8
MAX_VALUE = 16.0  # sklearn's digits are counts of "on" pixels in 4x4 blocks: 0..16


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ((N, 8, 8) float64 in 0..16, (N,) int64 labels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the digits data set comes from scikit-learn, which is not installed: "
            "from a checkout, `.venv/bin/pip install -e '.[digits]'` (`make demo` installs it; unfog is not on PyPI)"
        ) from e
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (N, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)  # (N,)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray, split: Split) -> np.ndarray:
    """Sorted indices of ``split`` in a deterministic stratified split of ``labels``."""
    if split not in SPLITS:
        check_choice("split", split, SPLITS)
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in np.unique(labels):  # ascending, so the draws happen in a fixed order
        members = np.flatnonzero(labels == c)
        n_test = int(round(TEST_FRACTION * len(members)))
        test.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def digits_tensors(split: Split = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split at once: ((N, 1, size, size) float32 in [-1, 1], (N,) int64 labels)."""
    if not isinstance(size, int) or size <= 0 or size % NATIVE_SIZE != 0:
        raise ValueError(f"size must be a positive multiple of {NATIVE_SIZE}, got {size!r}")
    images, labels = _load_raw()
    idx = split_indices(labels, split)
    x = torch.from_numpy(images[idx]).float()[:, None]  # (N, 1, 8, 8) in 0..16
    x = x / MAX_VALUE * 2.0 - 1.0  # [-1, 1]
    if size != NATIVE_SIZE:
        # Upsampling, so antialiasing would change nothing; bilinear never leaves [-1, 1].
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x.contiguous(), torch.from_numpy(labels[idx].copy())


class DigitsDataset(Dataset):
    """Handwritten digits: item ``i`` is ``(image (1, size, size) in [-1, 1], label int)``.

    The whole split lives in memory (``.images``, ``.labels``); it is under 2 MB at 16x16.
    """

    def __init__(self, split: Split = "train", size: int = 16):
        self.split = split
        self.size = size
        self.images, self.labels = digits_tensors(split, size)  # (N, 1, S, S), (N,)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, size={self.size}, n={len(self)})"
