"""Sets of image files with the prompt of each: a generated cell, or a folder given with --images.

A given folder is one set when it holds images itself, else one set per subfolder holding images
(an earlier run's ``OUT/images`` works: a subfolder named ``<sampler>_<steps>_<cfg>`` is read back
as that cell). Each image's prompt is, in this order: the first line of a caption file beside it
(``NAME.txt``, kohya's convention, as ``unfog train`` reads), the prompt in its PNG parameters, or
none (then CLIP score and adherence skip it, and say how many they skipped).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..pipelines.images import open_image, read_parameters
from ..pipelines.outputs import parse_parameters
from .generation import Cell, image_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CELL_NAME = re.compile(r"^(.+)_(\d+)_(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class ImageSet:
    cell: Cell
    paths: tuple[Path, ...]
    prompts: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def chunks(self, size: int = 64) -> Iterator[tuple[list[Image.Image], tuple[str | None, ...]]]:
        """(images, prompts) ``size`` at a time, so no more than that is in memory at once."""
        for start in range(0, len(self.paths), size):
            yield [open_image(p) for p in self.paths[start : start + size]], self.prompts[start : start + size]




def cell_set(cell: Cell, prompts: tuple[str, ...], per_prompt: int) -> ImageSet:
    """The images of a generated cell, image k for prompt k % P."""
    n = len(prompts) * per_prompt
    return ImageSet(cell, tuple(image_path(cell, k) for k in range(n)), tuple(prompts[k % len(prompts)]
                                                                            for k in range(n)))


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files of a folder (and its subfolders if ``recursive``), sorted, hidden ones left out."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def prompt_of(path: Path) -> str | None:
    caption = path.with_suffix(".txt")
    if caption.is_file():
        lines = caption.read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines else ""
    if path.suffix.lower() == ".png":
        text = read_parameters(path)
        if text is not None:
            return parse_parameters(text)["Prompt"]
    return None


def folder_sets(folder: Path) -> list[ImageSet]:
    """The sets of a folder given with --images (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"--images must be a folder of images, got {folder}")
    own = image_files(folder)
    if own:
        groups = [(folder, own)]
    else:
        groups = [(sub, files) for sub in sorted(p for p in folder.iterdir() if p.is_dir())
                  if (files := image_files(sub))]
    if not groups:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), nor do its subfolders")
    sets = []
    for path, files in groups:
        m = _CELL_NAME.match(path.name)
        cell = (Cell(path.name, path, m.group(1), int(m.group(2)), float(m.group(3))) if m
                else Cell(path.name, path))
        sets.append(ImageSet(cell, tuple(files), tuple(prompt_of(p) for p in files)))
    return sets
