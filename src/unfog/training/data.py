"""Training data: the data sets by name, and a resumable, deterministic batch order."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset


class EpochBatches:
    """Batches of indices over shuffled epochs. The permutation of epoch e comes from
    seed + e, so the position (epoch, offset) is the whole state: resuming replays the order."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("the data set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def next(self) -> Tensor:
        out, count = [], 0
        while count < self.batch_size:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - count, self.n - self.offset)
            out.append(self._perm[self.offset : self.offset + take])
            self.offset += take
            count += take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._permutation(self.epoch)


class LabelledImages:
    """Images (N, C, H, W) in [-1, 1] with optional class labels, indexable by a batch of indices."""

    def __init__(self, dataset: Dataset, num_classes: int | None):
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        items = [self.dataset[int(i)] for i in idx]
        if self.num_classes is None:
            return torch.stack([it["image"] for it in items]), None
        return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


def make_data(name: str, image_size: int, channels: int) -> LabelledImages:
    """"digits" -> the scikit-learn digits (train split, with labels); otherwise a folder path."""
    if name == "digits":
        from ..datasets.digits import NUM_CLASSES, DigitsDataset

        return LabelledImages(DigitsDataset("train", size=image_size), NUM_CLASSES)
    from ..datasets.folder import ImageFolderDataset

    if not Path(name).exists():
        raise FileNotFoundError(f"data set {name!r} is neither 'digits' nor an existing folder")
    return LabelledImages(ImageFolderDataset(name, image_size, channels=channels), None)
