"""The data of task "controlnet": (image, hint, caption) triples.

- ``"shapes"``: the procedural set, each item's hint its scene's layout map
  (``datasets.shapes.layout_hint``: every object's filled silhouette in white on black, from the
  coverage the image is rendered with, so hint and image are aligned to the pixel); in the spirit
  of the ControlNet paper's fill50k.
- An image folder (captions as for every fine-tuning task: a same-name ``.txt`` or a
  ``metadata.jsonl`` ``text``; kohya ``N_name`` repeat folders) whose hints are, per image:
  the ``hint`` column of its ``metadata.jsonl`` line (a path relative to that file's folder, as
  ``file_name`` is), else the image of the same relative path and stem (any accepted extension)
  in the folder ``hint/`` beside the image folder::

      fill/images/0001.png  fill/images/0001.txt  fill/hint/0001.png      (data = "fill/images")

  A hint must have its image's size: it is cropped exactly as its image is (centre or random crop).

Hints are float32 in [0, 1] (8-bit values / 255, as the pipeline reads a hint image); the trainer
brings them to the ControlNet's input size (8x the latents) as the pipeline does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..datasets.folder import EXTENSIONS, METADATA_FILE
from .data import CaptionedImages
from .lora_data import captioned_folder

HINT_FOLDER = "hint"  # beside the image folder
HINT_COLUMN = "hint"  # of metadata.jsonl


def hint_values(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255


def make_controlnet_data(name: str, image_size: int, data_size: int, seed: int, center_crop: bool, *,
                         shapes_config=None, workers: int = 0) -> CaptionedImages:
    """"shapes" (``data_size`` items with layout hints) or an image folder with hints (module docstring)."""
    if name == "shapes":
        return _shapes_data(image_size, data_size, seed, shapes_config, workers)
    folder, index, captions = captioned_folder(name, image_size, center_crop)
    hints = find_hints(folder.root, folder.files)
    for i, hint in enumerate(hints):
        with Image.open(hint) as img:
            size = ImageOps.exif_transpose(img).size[::-1]
        if size != folder.sizes[i]:
            raise ValueError(f"hint {hint} is {size[1]}x{size[0]} but its image {folder.files[i]} is "
                             f"{folder.sizes[i][1]}x{folder.sizes[i][0]}; a hint must have its image's size")

    def load_item(j: int, target, generator) -> dict:
        k = index[j]
        twin = None
        if generator is not None:  # the hint's crop draws what the image's does
            twin = torch.Generator().set_state(generator.get_state())
        item = folder.item(k, target, generator)
        hint, _, _ = folder.load_image(hints[k], target, twin)  # (3, h, w) in [-1, 1]
        return {**item, "caption": captions[k], "hint": ((hint + 1) * 127.5).round() / 255}

    data = CaptionedImages(len(index), load_item, lambda j: captions[index[j]], image_size,
                           random_crops=not center_crop, workers=workers)
    data.item_key = None  # no latent cache: the hints load with their images
    return data


def find_hints(root: Path, files: tuple[Path, ...]) -> list[Path]:
    """The hint file of each image (module docstring); a missing one is a one-line error naming it."""
    column = _hint_column(root)
    sibling = root.parent / HINT_FOLDER
    out = []
    for path in files:
        hint = column.get(path.resolve())
        if hint is None:
            rel = path.relative_to(root)
            found = [p for p in (sibling / rel.with_suffix(ext) for ext in EXTENSIONS) if p.is_file()]
            if len(found) > 1:
                raise ValueError(f"{path} has {len(found)} hint files: {', '.join(map(str, found))}; keep one")
            if not found:
                raise FileNotFoundError(f"no hint for {path}: expected {sibling / rel.with_suffix('.png')} (a "
                                        f"'{HINT_FOLDER}' folder beside {root}, same name) or a '{HINT_COLUMN}' "
                                        f"in its {METADATA_FILE} line")
            hint = found[0]
        elif not hint.is_file():
            raise FileNotFoundError(f"the hint of {path} named in {METADATA_FILE}, {hint}, does not exist")
        out.append(hint)
    return out


def _hint_column(root: Path) -> dict[Path, Path]:
    """The ``hint`` column of every ``metadata.jsonl`` under ``root``: image path -> hint path,
    both resolved relative to the metadata file's folder."""
    hints = {}
    for meta in sorted(root.rglob(METADATA_FILE)):
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
            row = json.loads(line) if line.strip() else {}
            if HINT_COLUMN in row:  # the folder reader has checked the lines' JSON and file_name
                if not isinstance(row[HINT_COLUMN], str):
                    raise ValueError(f"{meta}:{lineno}: '{HINT_COLUMN}' must be a path (a string), got "
                                     f"{row[HINT_COLUMN]!r}")
                hints[(meta.parent / row["file_name"]).resolve()] = meta.parent / row[HINT_COLUMN]
    return hints


def _shapes_data(image_size: int, data_size: int, seed: int, config, workers: int) -> CaptionedImages:
    from ..datasets.shapes import layout_hint, make_item, render, to_tensor
    from ..datasets.shapes_text import ShapesConfig

    config = config or ShapesConfig()

    def load_item(i: int, target, generator) -> dict:
        scene, text = make_item(i, image_size, seed, config)
        return {"image": to_tensor(render(scene, style=config.style_of(i))), "hint": hint_values(layout_hint(scene)),
                "caption": text, "original_size": (image_size, image_size), "crop_top_left": (0, 0),
                "target_size": (image_size, image_size)}

    data = CaptionedImages(data_size, load_item, lambda i: make_item(i, image_size, seed, config)[1], image_size,
                           workers=workers)
    data.item_key = None
    return data
