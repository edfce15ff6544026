"""A folder of images, optionally captioned, as a torch Dataset for training.

Every PNG / JPEG / WebP file under ``root`` (recursively; hidden files and folders are
ignored) becomes one item ``{"image": (C, size, size) float32 in [-1, 1], "caption": str,
"original_size": (h, w), "crop_top_left": (top, left), "target_size": (size, size)}``.
An image of any size is resized so its shorter side is ``size`` (bicubic) and then cropped
to ``size`` x ``size``: centred, or at a random position if ``center_crop=False`` (the
diffusers training-script convention). ``item(i, target=(h, w))`` crops to another size (an
aspect-ratio bucket, ``buckets.py``): the image is resized to cover it, then cropped. The sizes
are SDXL's micro-conditioning: ``original_size`` is the file's (after its EXIF rotation),
``crop_top_left`` the crop's offset in the resized image, ``target_size`` the crop's size.

Captions, optional (``""`` where none is found), come from either convention:

- kohya: a ``.txt`` file beside the image with the same stem (``cat.png`` -> ``cat.txt``);
- Hugging Face imagefolder: a ``metadata.jsonl`` whose lines hold ``file_name`` (relative to
  the folder of that ``metadata.jsonl``) and ``text``.

A ``.txt`` beside an image wins over a ``metadata.jsonl`` line for the same image.

Each file is decoded once at construction; files that fail are skipped, listed in
``.skipped`` and reported in a one-line warning, so one corrupt download does not end a
training run an hour later. A full decode (not just PIL's ``verify()``, which does not read
JPEG or WebP pixel data) catches truncated files; JPEGs are decoded at reduced scale to keep
this cheap.

Randomness (``random_flip``, ``center_crop=False``) draws from the ``generator`` given to
``item``, else (indexing) from torch's global generator, which ``torch.manual_seed`` and the
DataLoader's per-worker seeding control.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..choices import check_choice

log = logging.getLogger(__name__)

EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
CHANNELS: tuple[int, ...] = (1, 3)
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str  # "ExceptionType: message" from PIL


def _accepted() -> str:
    return ", ".join(EXTENSIONS)


def _list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, skipping hidden entries; sorted by relative path."""
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in EXTENSIONS and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_metadata(root: Path) -> dict[Path, str]:
    """Captions from every ``metadata.jsonl`` under ``root``, keyed by resolved image path."""
    captions: dict[Path, str] = {}
    for meta in sorted(root.rglob(METADATA_FILE)):
        with meta.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{meta}:{lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict) or "file_name" not in row:
                    raise ValueError(f"{meta}:{lineno}: each line needs a 'file_name' key")
                text = row.get("text", "")
                if not isinstance(text, str):
                    raise ValueError(f"{meta}:{lineno}: 'text' must be a string, got {type(text).__name__}")
                captions[(meta.parent / row["file_name"]).resolve()] = text
    return captions


def _caption_for(path: Path, metadata: dict[Path, str]) -> str:
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    return metadata.get(path.resolve(), "")


_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _probe(path: Path, size: int) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width) after the EXIF rotation, None) if the file decodes fully, else
    (None, the reason it does not)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
                w, h = h, w
            img.draft("RGB", (size, size))  # JPEG only: decode at 1/2..1/8 scale; no-op otherwise
            img.load()
    except Exception as e:  # PIL decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        return None, f"{type(e).__name__}: {e}"
    return (h, w), None


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB": alpha composited over white, 16-bit scaled (not clipped) to 8."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64) / 65535.0 * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # (H, W) uint8 -> "L"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(mode)


def _resize_to_cover(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """The smallest (aspect-preserving, bicubic) resize that covers ``target`` (height, width);
    for a square target, the shorter side becomes its side."""
    (w, h), (th, tw) = img.size, target
    scale = max(tw / w, th / h)
    new = (max(tw, round(w * scale)), max(th, round(h * scale)))
    return img if new == (w, h) else img.resize(new, resample=Image.Resampling.BICUBIC)


class ImageFolderDataset(Dataset):
    """Images (and captions) under ``root``: item = ``{"image": (C, size, size), "caption": str,
    "original_size", "crop_top_left", "target_size"}`` (see the module docstring).

    Attributes: ``files`` (the readable images, sorted), ``captions`` (one per file), ``sizes``
    ((height, width) of each file, EXIF rotation applied), ``skipped`` (a ``SkippedFile`` per
    unreadable file).
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        channels: int = 3,
    ):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if channels not in CHANNELS:
            check_choice("channels", channels, CHANNELS)
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist (looking for {_accepted()} files)")
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder (looking for {_accepted()} files in one)")
        candidates = _list_images(root)
        if not candidates:
            raise ValueError(f"no image files under {root}; accepted extensions: {_accepted()}")

        self.root, self.size, self.channels = root, size, channels
        self.center_crop, self.random_flip = center_crop, random_flip
        files, sizes, skipped = [], [], []
        for path in candidates:
            hw, reason = _probe(path, size)
            if reason is None:
                files.append(path)
                sizes.append(hw)
            else:
                skipped.append(SkippedFile(path, reason))
        if not files:
            raise ValueError(
                f"none of the {len(candidates)} image files under {root} could be read "
                f"(first: {skipped[0].path}: {skipped[0].reason}); accepted extensions: {_accepted()}"
            )
        if skipped:
            log.warning(
                "skipped %d unreadable image file(s) of %d under %s (first: %s: %s)",
                len(skipped), len(candidates), root, skipped[0].path, skipped[0].reason,
            )
        metadata = _read_metadata(root)
        self.files: tuple[Path, ...] = tuple(files)
        self.captions: tuple[str, ...] = tuple(_caption_for(p, metadata) for p in files)
        self.sizes: tuple[tuple[int, int], ...] = tuple(sizes)
        self.skipped: tuple[SkippedFile, ...] = tuple(skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str | tuple[int, int]]:
        return self.item(i)

    def item(self, i: int, target: tuple[int, int] | None = None,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor | str | tuple[int, int]]:
        """Item ``i`` cropped to ``target`` (height, width; default ``(size, size)``); a random
        crop and flip draw from ``generator`` (default: torch's global generator)."""
        image, original, crop = self.load_image(self.files[i], target, generator)
        return {"image": image, "caption": self.captions[i], "original_size": original, "crop_top_left": crop,
                "target_size": tuple(image.shape[-2:])}

    def load_image(self, path: Path, target: tuple[int, int] | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """(C, h, w) float32 in [-1, 1] with this dataset's crop and flip, (h, w) = ``target`` or
        (size, size); the file's (height, width); the crop's (top, left) in the resized image."""
        th, tw = target or (self.size, self.size)
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # camera JPEGs: apply the EXIF rotation
            img = _to_mode(img, _MODE_FOR_CHANNELS[self.channels])
        original = (img.height, img.width)
        img = _resize_to_cover(img, (th, tw))
        top, left = self._crop_top_left(img.height - th, img.width - tw, generator)
        img = img.crop((left, top, left + tw, top + th))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W) or (H, W, 3)
        x = x.reshape(th, tw, self.channels).permute(2, 0, 1)  # (C, H, W)
        x = x.float() / 127.5 - 1.0
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x, original, (top, left)

    def _crop_top_left(self, spare_h: int, spare_w: int, generator: torch.Generator | None) -> tuple[int, int]:
        """(top, left) of the crop, given how many rows and columns the resize left over."""
        if self.center_crop:
            return spare_h // 2, spare_w // 2
        left = int(torch.randint(spare_w + 1, (), generator=generator))  # left first: the order of earlier versions
        top = int(torch.randint(spare_h + 1, (), generator=generator))
        return top, left

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, size={self.size}, n={len(self)}, "
            f"skipped={len(self.skipped)}, channels={self.channels})"
        )
