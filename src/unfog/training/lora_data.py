"""The data of LoRA training (task "lora"): kohya's folder conventions, caption dropout and tag
shuffling, and the cache of the training images' latents (the VAE is frozen).

Folders. Every image under the data folder is an item, captioned by a same-name ``.txt`` beside
it or a ``metadata.jsonl`` line (``datasets/folder.py``). A top-level subfolder named ``N_name``
(kohya's "DreamBooth" layout, e.g. ``10_sks dog``) repeats each of its images N times per epoch,
and ``name`` is the caption of its images that have none (kohya's class tokens); images elsewhere
count once. With ``lora.aspect_buckets`` the images are sorted into aspect-ratio buckets as for
text2image (``datasets/buckets.py``; a repeated image counts N times towards a bucket's size).

Captions, per sample of a global batch (the trainer draws every random number from its own
generator, so that a resumed or distributed run sees exactly the captions of an uninterrupted one):
dropped to "" with probability ``caption_dropout``; with ``shuffle_tags`` the comma-separated tags
after the first ``keep_tokens`` are put in a random order (kohya's ``shuffle_caption`` /
``keep_tokens``) and joined with ", ".

Latent cache. The posterior of each image, its mean and standard deviation (not a sample: the
trainer still draws z = mean + std * n every step, so a cached run trains as an uncached one),
with the image's sizes. "memory" encodes every item once before the first step; "disk" keeps the
entries in one safetensors file, keyed by the sha256 of (the item's identity: file path, mtime
and size, or the procedural item's seed and index; the crop's size) and of the VAE's weights, so
an edited image or another VAE is encoded afresh. The file is rewritten atomically when entries
were added.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..checkpoint.io import load_safetensors, save_safetensors
from .data import CaptionedImages, make_captioned_data

REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


def repeat_of(root: Path, path: Path) -> tuple[int, str]:
    """(repeats, class caption) of an image: from its top-level folder ``N_name`` under ``root``,
    else (1, "")."""
    parts = path.relative_to(root).parts
    match = REPEAT_FOLDER.match(parts[0]) if len(parts) > 1 else None
    if match is None:
        return 1, ""
    repeats = int(match[1])
    if repeats < 1:
        raise ValueError(f"{root / parts[0]}: a kohya repeat folder needs N >= 1 in N_name, got {repeats}")
    return repeats, match[2].strip()


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """The caption's comma-separated tags, the first ``keep_tokens`` in place and the rest in the
    order of a permutation drawn from ``generator``, joined with ", "."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(kept + [rest[i] for i in order])


def transform_captions(captions: Sequence[str], drop: Tensor, seeds: Tensor | None, keep_tokens: int) -> list[str]:
    """The captions of a batch with dropout (``drop`` (B,) bool: ""), then tag shuffling from the
    per-sample ``seeds`` (B,) (None: no shuffling)."""
    out = []
    for k, text in enumerate(captions):
        if bool(drop[k]):
            out.append("")
        elif seeds is None:
            out.append(text)
        else:
            out.append(shuffle_tags(text, keep_tokens, torch.Generator().manual_seed(int(seeds[k]))))
    return out


def captioned_folder(name: str, image_size: int, center_crop: bool):
    """An image folder with kohya's ``N_name`` repeat folders: (the ``ImageFolderDataset``, item ->
    file index with each file repeated N times, each file's caption: its own or its folder's class
    caption). An image with neither is a one-line error naming it."""
    from ..datasets.folder import ImageFolderDataset

    if not Path(name).is_dir():
        raise FileNotFoundError(f"data set {name!r} is neither 'shapes' nor an existing folder")
    folder = ImageFolderDataset(name, image_size, channels=3, center_crop=center_crop)
    index, captions = [], []
    for i, path in enumerate(folder.files):
        repeats, class_caption = repeat_of(folder.root, path)
        index += [i] * repeats
        captions.append(folder.captions[i] or class_caption)
    missing = [str(folder.files[i]) for i, text in enumerate(captions) if not text]
    if missing:
        raise ValueError(f"{name}: {len(missing)} of {len(captions)} images have no caption (e.g. {missing[0]}): give "
                         "a same-name .txt beside it, a metadata.jsonl line, or put it in a kohya N_name folder")
    return folder, index, captions


def make_lora_data(name: str, image_size: int, data_size: int, seed: int, center_crop: bool, *,
                   bucket_step: int | None, min_bucket: int, shapes_config=None, workers: int = 0) -> CaptionedImages:
    """"shapes" (``data_size`` procedural items) or an image folder with kohya's repeat folders;
    every item has a caption. Sets ``item_key`` on the result."""
    if name == "shapes":
        data = make_captioned_data(name, image_size, data_size, seed, center_crop, bucket_step=bucket_step,
                                   min_bucket=min_bucket, shapes_config=shapes_config, workers=workers)
        config = repr(sorted(asdict(shapes_config).items())) if shapes_config is not None else "default"
        data.item_key = lambda i: f"shapes|{seed}|{i}|{config}|{image_size}"
        return data
    from ..datasets.buckets import assign_buckets, make_buckets

    folder, index, captions = captioned_folder(name, image_size, center_crop)
    buckets = bucket_of = None
    if bucket_step is not None:
        buckets = make_buckets(image_size * image_size, bucket_step)
        bucket_of = assign_buckets([folder.sizes[i] for i in index], buckets, min_bucket)

    def load_item(j: int, target, generator) -> dict:
        return {**folder.item(index[j], target, generator), "caption": captions[index[j]]}

    data = CaptionedImages(len(index), load_item, lambda j: captions[index[j]], image_size, buckets=buckets,
                           bucket_of=bucket_of, random_crops=not center_crop, workers=workers)

    def item_key(j: int) -> str:
        path = folder.files[index[j]].resolve()
        stat = path.stat()
        return f"file|{path}|{stat.st_mtime_ns}|{stat.st_size}|{data.target_of(j)}"

    data.item_key = item_key
    return data


def module_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().reshape(-1)  # flat, stride 1 (a channels-last 1x1 conv is not)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class Posterior:
    """One cached item: the VAE posterior's mean and std (C, h, w) in float32, and the item's
    sizes (6,) (``CaptionedBatch.sizes``)."""

    __slots__ = ("mean", "std", "sizes")

    def __init__(self, mean: Tensor, std: Tensor, sizes: Tensor):
        self.mean, self.std, self.sizes = mean, std, sizes


def encode_items(data: CaptionedImages, idx: Sequence[int], vae, device: torch.device) -> list[Posterior]:
    """The posteriors of items ``idx`` (of one target size), encoded as one batch."""
    batch = data.batch(torch.tensor(list(idx)))
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        posterior = vae.encode(batch.images.to(device, dtype))
    mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    return [Posterior(mean[k], std[k], batch.sizes[k]) for k in range(len(idx))]


def cache_latents(data: CaptionedImages, vae, device: torch.device, path: Path | None, batch_size: int = 8,
                  progress: bool = True) -> list[Posterior]:
    """Every item's ``Posterior``; with ``path`` (a disk cache), reading the entries still valid
    and writing the file again (atomically) when some had to be encoded."""
    vae_key = module_hash(vae)
    keys = [hashlib.sha256(f"{data.item_key(i)}|{vae_key}".encode()).hexdigest() for i in range(len(data))]
    stored: dict[str, Tensor] = {}
    if path is not None and path.is_file():
        stored, _ = load_safetensors(path)
    out: list[Posterior | None] = [None] * len(data)
    todo: dict[tuple[int, int], list[int]] = {}  # target size -> items to encode
    for i, key in enumerate(keys):
        if f"{key}.mean" in stored:
            out[i] = Posterior(stored[f"{key}.mean"], stored[f"{key}.std"], stored[f"{key}.sizes"])
        else:
            todo.setdefault(data.target_of(i), []).append(i)
    bar = tqdm(total=sum(map(len, todo.values())), desc="caching latents", unit="img", disable=not progress)
    for items in todo.values():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            for i, posterior in zip(chunk, encode_items(data, chunk, vae, device)):
                out[i] = posterior
            bar.update(len(chunk))
    bar.close()
    if path is not None and todo:
        tensors = {f"{key}.{part}": getattr(p, part) for key, p in zip(keys, out) for part in Posterior.__slots__}
        save_safetensors(path, tensors, {"format": "unfog-latent-cache", "vae_sha256": vae_key})
    return out
