"""Training data: the data sets by name, and a resumable, deterministic batch order."""

from __future__ import annotations

from collections.abc import Callable
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


class CaptionedImages:
    """Images (N, 3, H, W) in [-1, 1] with captions, indexable by a batch of indices.
    ``caption_of(i)``: item i's caption without loading its image."""

    def __init__(self, dataset: Dataset, caption_of: Callable[[int], str]):
        self.dataset, self.caption_of = dataset, caption_of

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, idx: Tensor) -> tuple[Tensor, list[str]]:
        items = [self.dataset[int(i)] for i in idx]
        return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]

    def captions(self, limit: int = 20_000) -> list[str]:
        """Captions of up to ``limit`` items (spread over the set): the text a tokenizer must cover."""
        step = max(1, len(self.dataset) // limit)
        return [self.caption_of(i) for i in range(0, len(self.dataset), step)]


def make_captioned_data(name: str, image_size: int, size: int, seed: int, center_crop: bool = True,
                        need_captions: bool = True) -> CaptionedImages:
    """"shapes" -> ``size`` procedural items from ``seed``; otherwise a captioned image folder."""
    if name == "shapes":
        from ..datasets.shapes import ShapesDataset, make_item

        return CaptionedImages(ShapesDataset(size, size=image_size, seed=seed),
                               lambda i: make_item(i, image_size, seed)[1])
    from ..datasets.folder import ImageFolderDataset

    if not Path(name).is_dir():
        raise FileNotFoundError(f"data set {name!r} is neither 'shapes' nor an existing folder")
    data = ImageFolderDataset(name, image_size, channels=3, center_crop=center_crop)
    if need_captions:
        uncaptioned = [i for i, text in enumerate(data.captions) if not text]
        if uncaptioned:
            raise ValueError(f"{name}: {len(uncaptioned)} of {len(data)} images have no caption; a text-to-image "
                             "model needs one per image: a same-name .txt file beside it (kohya) or a "
                             "metadata.jsonl with file_name and text (Hugging Face imagefolder)")
    return CaptionedImages(data, data.captions.__getitem__)
