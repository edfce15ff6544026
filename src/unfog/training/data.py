"""Training data: the data sets by name, and resumable, deterministic batch orders."""

from __future__ import annotations

import multiprocessing
import signal
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
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


class BucketBatches:
    """Batches of indices that each lie in one bucket (aspect-ratio buckets, ``datasets/buckets.py``),
    over shuffled epochs; ``buckets[i]`` is item i's bucket.

    Epoch e is a pure function of seed + e: one generator seeded with it shuffles the members of
    each bucket (in bucket order), cuts each bucket into batches of ``batch_size``, then shuffles
    the batches. The last ``len(bucket) % batch_size`` images of each shuffled bucket sit out that
    epoch (batches never mix buckets and never run short, which keeps the global batch divisible
    among torchrun's processes); the shuffle differs every epoch, so a different few sit out each
    time. The position (epoch, position) is the whole state: resuming replays the order. A bucket
    must fill at least one batch (``assign_buckets`` merges smaller ones away).
    """

    def __init__(self, buckets: Sequence[int], batch_size: int, seed: int):
        if not buckets:
            raise ValueError("the data set is empty")
        self.batch_size, self.seed = batch_size, seed
        ids = torch.tensor(list(buckets))
        self.members = {int(k): torch.nonzero(ids == k).flatten() for k in torch.unique(ids)}  # sorted
        short = {k: len(m) for k, m in self.members.items() if len(m) < batch_size}
        if short:
            raise ValueError(f"bucket(s) {short} (bucket: images) hold fewer images than batch_size {batch_size} "
                             "and could never fill a batch: lower batch_size or add images")
        self.epoch, self.position = 0, 0
        self._order = self.epoch_batches(0)

    def epoch_batches(self, epoch: int) -> list[Tensor]:
        """The batches of ``epoch`` in order, each (batch_size,) indices of one bucket."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        batches: list[Tensor] = []
        for members in self.members.values():
            shuffled = members[torch.randperm(len(members), generator=g)]
            full = len(members) // self.batch_size * self.batch_size  # the rest sit out this epoch
            batches.extend(shuffled[:full].split(self.batch_size))
        return [batches[int(j)] for j in torch.randperm(len(batches), generator=g)]

    def next(self) -> Tensor:
        if self.position == len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self.epoch_batches(self.epoch)
        batch = self._order[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self.epoch_batches(self.epoch)


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


Size = tuple[int, int]  # (height, width)
ItemLoader = Callable[[int, Size, torch.Generator | None], dict]  # (index, target size, crop generator) -> item


class CaptionedBatch(NamedTuple):
    images: Tensor  # (B, 3, h, w) in [-1, 1], all of one size
    captions: list[str]
    sizes: Tensor  # (B, 6) float32: original (h, w), crop top-left (top, left), target (h, w); SDXL's order
    hints: Tensor | None = None  # (B, 3, h, w) float32 in [0, 1]: ControlNet hints, where the items have them


class CaptionedImages:
    """Captioned images, indexable by a batch of indices (``batch``), each cropped to its target
    size: ``image_size`` squared, or its aspect-ratio bucket's (``buckets``, ``bucket_of``).

    ``load_item(i, target, generator)``: item i (image, caption and its sizes, see
    ``ImageFolderDataset.item``). ``caption_of(i)``: its caption without loading its image.
    ``random_crops``: the items are cropped at random positions, drawn from per-item generators
    seeded by ``crop_seeds`` (which the trainer draws from its own generator, so that a resumed
    or distributed run crops exactly as an uninterrupted single process does).
    """

    def __init__(self, n: int, load_item: ItemLoader, caption_of: Callable[[int], str], image_size: int, *,
                 buckets: Sequence[Size] | None = None, bucket_of: Sequence[int] | None = None,
                 random_crops: bool = False, workers: int = 0):
        if (buckets is None) != (bucket_of is None):
            raise ValueError("give both buckets and bucket_of, or neither")
        self.n, self.load_item, self.caption_of, self.image_size = n, load_item, caption_of, image_size
        self.buckets = None if buckets is None else tuple(buckets)
        self.bucket_of = None if bucket_of is None else tuple(bucket_of)
        self.random_crops = random_crops
        self.workers = workers
        self._pool = None  # the worker processes, started at the first batch

    def __len__(self) -> int:
        return self.n

    def target_of(self, i: int) -> Size:
        """The (height, width) item i is cropped to."""
        if self.buckets is None:
            return self.image_size, self.image_size
        return self.buckets[self.bucket_of[i]]

    def crop_seeds(self, n: int, generator: torch.Generator) -> Tensor | None:
        """(n,) seeds of the random crops of a batch of n, drawn from ``generator``; None (and no
        draw) for centre crops."""
        return torch.randint(0, 2**62, (n,), generator=generator) if self.random_crops else None

    def batch(self, idx: Tensor, seeds: Tensor | None = None) -> CaptionedBatch:
        """Items ``idx`` (all of one target size); ``seeds`` from ``crop_seeds`` for random crops."""
        if self.random_crops and seeds is None:
            raise ValueError("random crops need their seeds (crop_seeds)")
        jobs = [(int(i), self.target_of(int(i)), None if seeds is None else int(seeds[k])) for k, i in enumerate(idx)]
        if not self.workers:
            return self.load_chunk(jobs)
        # Contiguous chunks, one per worker; each comes back as one array (unpickling a tensor per
        # image cost more than drawing it).
        bounds = [len(jobs) * k // self.workers for k in range(self.workers + 1)]
        chunks = [jobs[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        parts = self._worker_pool().map(_load_chunk_in_worker, chunks)
        images = torch.from_numpy(np.concatenate([p.images for p in parts]))
        sizes = torch.from_numpy(np.concatenate([p.sizes for p in parts]))
        hints = None if parts[0].hints is None else torch.from_numpy(np.concatenate([p.hints for p in parts]))
        return CaptionedBatch(images, [c for p in parts for c in p.captions], sizes, hints)

    def load_chunk(self, jobs: list[tuple[int, Size, int | None]]) -> CaptionedBatch:
        """The batch of items ``jobs`` (see ``load``)."""
        items = [self.load(job) for job in jobs]
        sizes = torch.tensor([[*it["original_size"], *it["crop_top_left"], *it["target_size"]] for it in items],
                             dtype=torch.float32)
        hints = torch.stack([it["hint"] for it in items]) if "hint" in items[0] else None
        return CaptionedBatch(torch.stack([it["image"] for it in items]), [it["caption"] for it in items], sizes, hints)

    def load(self, job: tuple[int, Size, int | None]) -> dict:
        """Item ``(index, target size, crop seed or None)``: the same in a worker as here."""
        i, target, seed = job
        return self.load_item(i, target, None if seed is None else torch.Generator().manual_seed(seed))

    def _worker_pool(self):
        """``workers`` processes that load the items of each batch in parallel (the loaders are
        deterministic per item, so the batches are those of a single process, bit for bit). They
        are forked, inheriting this object, so the loaders need not be picklable."""
        if self._pool is None:
            if "fork" not in multiprocessing.get_all_start_methods():
                raise ValueError("data_workers needs the 'fork' start method of multiprocessing, which this "
                                 "platform lacks; set data_workers to 0")
            self._pool = multiprocessing.get_context("fork").Pool(self.workers, _start_worker, (self,))
            weakref.finalize(self, self._pool.terminate)
        return self._pool

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # a process pool does not travel

    def captions(self, limit: int = 20_000) -> list[str]:
        """Captions of up to ``limit`` items (spread over the set): the text a tokenizer must cover."""
        step = max(1, self.n // limit)
        return [self.caption_of(i) for i in range(0, self.n, step)]


_WORKER_DATA: CaptionedImages | None = None  # in a worker process: the data set it loads from


def _start_worker(data: CaptionedImages) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    torch.set_num_threads(1)  # the workers are the parallelism
    # The training process's signal handlers were forked too: a worker must end on SIGTERM (the
    # pool's way of stopping it) and leave Ctrl-C, which the terminal sends it as well, to the trainer.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load_chunk_in_worker(jobs: list[tuple[int, Size, int | None]]) -> CaptionedBatch:
    """The chunk's batch with numpy arrays, which travel between processes as one buffer each."""
    batch = _WORKER_DATA.load_chunk(jobs)
    return CaptionedBatch(batch.images.numpy(), batch.captions, batch.sizes.numpy(),
                          None if batch.hints is None else batch.hints.numpy())


def _square_item(item: dict, size: int) -> dict:
    """A procedural item drawn at its size: original = target = (size, size), crop (0, 0)."""
    return {**item, "original_size": (size, size), "crop_top_left": (0, 0), "target_size": (size, size)}


def make_captioned_data(name: str, image_size: int, size: int, seed: int, center_crop: bool = True,
                        need_captions: bool = True, bucket_step: int | None = None,
                        min_bucket: int = 1, shapes_config=None, workers: int = 0) -> CaptionedImages:
    """"shapes" -> ``size`` procedural items from ``seed``; otherwise a captioned image folder.
    ``bucket_step``: sort the folder's images into aspect-ratio buckets of area at most
    ``image_size``^2 and sides multiples of ``bucket_step``, each holding at least ``min_bucket``
    images (``datasets/buckets.py``). ``shapes_config``: the ShapesConfig of "shapes" (None: the
    defaults). ``workers``: processes that load each batch's items in parallel (0: this one)."""
    if name == "shapes":
        from ..datasets.shapes import ShapesDataset, make_item
        from ..datasets.shapes_text import ShapesConfig

        if bucket_step is not None:
            raise ValueError("aspect-ratio buckets need an image folder; the shapes images are all square")
        config = shapes_config or ShapesConfig()
        shapes = ShapesDataset(size, size=image_size, seed=seed, config=config)
        return CaptionedImages(size, lambda i, target, g: _square_item(shapes[i], image_size),
                               lambda i: make_item(i, image_size, seed, config)[1], image_size, workers=workers)
    if shapes_config is not None:
        raise ValueError(f"a ShapesConfig applies to data 'shapes', not {name!r}")
    from ..datasets.buckets import assign_buckets, make_buckets
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
    buckets = bucket_of = None
    if bucket_step is not None:
        buckets = make_buckets(image_size * image_size, bucket_step)
        bucket_of = assign_buckets(data.sizes, buckets, min_bucket)
    return CaptionedImages(len(data), data.item, data.captions.__getitem__, image_size, buckets=buckets,
                           bucket_of=bucket_of, random_crops=not center_crop, workers=workers)
