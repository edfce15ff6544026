"""A folder of images, optionally captioned, as a torch Dataset for training.

Every PNG / JPEG / WebP file under ``root`` (recursively; hidden files and folders are
ignored) becomes one item ``{"image": (C, size, size) float32 in [-1, 1], "caption": str}``.
An image of any size is resized so its shorter side is ``size`` (bicubic) and then cropped
to ``size`` x ``size``: centred, or at a random position if ``center_crop=False`` (the
diffusers training-script convention).

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

Randomness (``random_flip``, ``center_crop=False``) draws from torch's global generator,
which ``torch.manual_seed`` and the DataLoader's per-worker seeding control.
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


def _check_readable(path: Path, size: int) -> str | None:
    """None if the file decodes fully, else the reason it does not."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG only: decode at 1/2..1/8 scale; no-op otherwise
            img.load()
    except Exception as e:  # PIL decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        return f"{type(e).__name__}: {e}"
    return None


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB": alpha composited over white, 16-bit scaled (not clipped) to 8."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64) / 65535.0 * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # (H, W) uint8 -> "L"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(mode)


def _resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, resample=Image.Resampling.BICUBIC)


class ImageFolderDataset(Dataset):
    """Images (and captions) under ``root``: item = ``{"image": (C, size, size), "caption": str}``.

    Attributes: ``files`` (the readable images, sorted), ``captions`` (one per file),
    ``skipped`` (a ``SkippedFile`` per unreadable file).
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
            raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
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
        files, skipped = [], []
        for path in candidates:
            reason = _check_readable(path, size)
            if reason is None:
                files.append(path)
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
        self.skipped: tuple[SkippedFile, ...] = tuple(skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        return {"image": self.load_image(self.files[i]), "caption": self.captions[i]}

    def load_image(self, path: Path) -> torch.Tensor:
        """(C, size, size) float32 in [-1, 1], with this dataset's crop and flip."""
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # camera JPEGs: apply the EXIF rotation
            img = _to_mode(img, _MODE_FOR_CHANNELS[self.channels])
        img = _resize_shorter_side(img, self.size)
        img = img.crop(self._crop_box(*img.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W) or (H, W, 3)
        x = x.reshape(self.size, self.size, self.channels).permute(2, 0, 1)  # (C, H, W)
        x = x.float() / 127.5 - 1.0
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        if self.center_crop:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        else:
            left = int(torch.randint(w - self.size + 1, ()))
            top = int(torch.randint(h - self.size + 1, ()))
        return left, top, left + self.size, top + self.size

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, size={self.size}, n={len(self)}, "
            f"skipped={len(self.skipped)}, channels={self.channels})"
        )
