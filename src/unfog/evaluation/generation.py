"""The images of an evaluation run: models behind one ``draw`` call, the cell folders, and
generation that resumes.

Cell (sampler, steps, cfg) writes ``OUT/images/<sampler>_<steps>_<cfg>/NNNNN.png``. Image k is
draw k // P of prompt k % P (P prompts) with seed ``seed + k``: the numbering is sample-major, so
raising the images per prompt adds files without renumbering any, and every cell draws the same
k from the same noise. Each PNG carries its parameters (A1111's text, as ``unfog generate``).

Resuming: an image whose file exists is not drawn again, once its recorded prompt, seed,
settings and model hash are checked to be this run's (a different run in the same folder is an
error, not a silent mix). Files are written to a hidden temporary name and renamed into place, so
a run killed mid-write leaves no half-written ``NNNNN.png``; leftovers are deleted on the next run.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from ..checkpoint.io import TEMP_SUFFIX
from ..pipelines.images import read_parameters, save_png, to_uint8
from ..pipelines.outputs import ModelId, format_parameters, parse_parameters, sampler_name, schedule_type

PARTIAL = TEMP_SUFFIX  # suffix of save_png's temporary files: ".NNNNN.png.<random>.tmp"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


# ---------------------------------------------------------------- models


class PixelModel:
    """unfog's pixel models (the digits model): prompts name classes ("3", "digit 3", or a class
    name); an unconditional model ignores them."""

    kind = "pixel"

    def __init__(self, path: Path, device: str = "cpu"):
        from ..pipelines.pixel import PixelDiffusion

        self.path, self.id = Path(path), ModelId.of(path)
        self.pipe = PixelDiffusion.load(path, device)
        self.defaults = dict(self.pipe.defaults)  # what the model file recommends

    def default_prompts(self) -> tuple[str, ...]:
        info = self.pipe.info
        if info.num_classes is None:
            return ("",)
        return tuple(info.class_names or (str(k) for k in range(info.num_classes)))

    def label(self, prompt: str) -> int | None:
        """The class a prompt asks for; ValueError if it names none."""
        from ..metrics.adherence import parse_digit

        info = self.pipe.info
        if info.num_classes is None:
            return None
        names = info.class_names or ()
        label = names.index(prompt.strip()) if prompt.strip() in names else parse_digit(prompt)
        if label is None or not 0 <= label < info.num_classes:
            valid = ", ".join(names) if names else f"0..{info.num_classes - 1}"
            raise ValueError(f"{self.path.name} is a class-conditional pixel model; its prompts name a class "
                             f"({valid}; 'digit 3' works too), got {prompt!r}")
        return label

    def check_prompts(self, prompts) -> None:
        for prompt in prompts:
            self.label(prompt)

    def spacing(self, sampler: str) -> str:
        from ..diffusion import resolve_sampler

        return resolve_sampler(sampler).spacing or "leading"

    def draw(self, prompt: str, *, sampler: str, steps: int, cfg_scale: float, seed: int) -> Image.Image:
        label = self.label(prompt)
        if label is None:
            x = self.pipe.generate(num_images=1, sampler=sampler, steps=steps, seed=seed)
        else:
            x = self.pipe.generate([label], sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed)
        pixels = to_uint8(x)[0].numpy()  # (H, W, C)
        return Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")


class TextModel:
    """unfog's text-to-image models and Stable Diffusion checkpoints (``unfog.load``)."""

    def __init__(self, path: Path, kind: str, device: str = "cpu"):
        import unfog

        from ..pipelines.latent_model import recommended_settings
        from ..pipelines.outputs import Settings

        self.path, self.kind, self.id = Path(path), kind, ModelId.of(path)
        self.pipe = unfog.load(path, device=device)
        base = Settings()
        self.defaults = {"sampler": base.sampler, "steps": base.steps, "cfg_scale": base.cfg_scale,
                         **recommended_settings(path)}

    def default_prompts(self) -> tuple[str, ...]:
        if self.kind != "text2image":
            raise ValueError(f"give --prompts FILE: {self.path.name} has no default prompt set")
        from ..metrics.shapes_eval import prompt_set

        return tuple(spec.text for spec in prompt_set(4))  # 4 canonical prompts of each shapes category

    def check_prompts(self, prompts) -> None:
        pass  # every text is a prompt; adherence skips the ones outside its domain

    def spacing(self, sampler: str) -> str:
        return self.pipe.spacing_for(sampler)

    def draw(self, prompt: str, *, sampler: str, steps: int, cfg_scale: float, seed: int) -> Image.Image:
        """One image through ``pipelines.draw.draw``, the drawing the CLI and the server use."""
        from ..pipelines.draw import draw
        from ..pipelines.outputs import Settings

        settings = Settings(prompt=prompt, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed)
        return draw(self.pipe, None, settings, None, None, prompt, progress=_no_bar)


@contextmanager
def _no_bar(total: int, desc: str):
    """``draw``'s progress for eval, which shows its own bar over the images."""
    yield SimpleNamespace(callback=None)


def model_kind(path: Path) -> str:
    """"pixel", "text2image" (unfog's own models) or "checkpoint" (anything ``unfog.load`` reads),
    from the file's header only."""
    from ..pipelines.latent_model import is_text2image_model
    from ..pipelines.pixel import is_pixel_model

    if is_pixel_model(path):
        return "pixel"
    return "text2image" if is_text2image_model(path) else "checkpoint"


def load_model(path: Path, device: str = "cpu") -> PixelModel | TextModel:
    if not Path(path).exists():
        raise FileNotFoundError(f"model not found: {path}")
    kind = model_kind(path)
    return PixelModel(path, device) if kind == "pixel" else TextModel(path, kind, device)


# ---------------------------------------------------------------- cells


def _number(value: float) -> str:
    """7.0 -> "7", 1.5 -> "1.5": as short as exact."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class Cell:
    """One setting of the grid and its folder. ``sampler``, ``steps``, ``cfg_scale`` are None for
    a folder of given images whose name does not tell them."""

    name: str
    folder: Path
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None

    @classmethod
    def of(cls, root: Path, sampler: str, steps: int, cfg_scale: float) -> Cell:
        name = f"{_UNSAFE.sub('-', sampler.strip())}_{steps}_{_number(cfg_scale)}"
        return cls(name, Path(root) / name, sampler, steps, cfg_scale)


def image_path(cell: Cell, k: int) -> Path:
    return cell.folder / f"{k:05d}.png"


def parameters_text(model, prompt: str, *, sampler: str, steps: int, cfg_scale: float, seed: int,
                    size: tuple[int, int]) -> str:
    from .. import __version__

    values = {"Steps": steps, "Sampler": sampler_name(sampler), "Schedule type": schedule_type(model.spacing(sampler)),
              "CFG scale": cfg_scale, "Seed": seed, "Size": f"{size[0]}x{size[1]}", "Model hash": model.id.hash,
              "Model": model.id.name, "Version": f"unfog {__version__}"}
    return format_parameters(prompt, "", values)


def _check_existing(path: Path, expected: str) -> None:
    """An image left by an earlier run must have been drawn with these very settings."""
    text = read_parameters(path)
    found = parse_parameters(text) if text else {}
    want = parse_parameters(expected)
    keys = ("Prompt", "Seed", "Steps", "Sampler", "CFG scale", "Model hash")
    differ = [k for k in keys if found.get(k) != want.get(k)]
    if differ:
        detail = "; ".join(f"{k}: {found.get(k)!r} there, {want.get(k)!r} now" for k in differ)
        raise ValueError(f"{path} was drawn with other settings ({detail}); the prompts, seed or model changed. "
                         "Give another --out, or delete that folder to draw it again")


def generate_cell(model, cell: Cell, prompts: tuple[str, ...], per_prompt: int, seed: int,
                  progress: bool = True) -> tuple[int, int]:
    """Draw the images of ``cell`` that are not there yet; returns (drawn now, found)."""
    from tqdm import tqdm

    cell.folder.mkdir(parents=True, exist_ok=True)
    for stale in cell.folder.glob(f".*.png*{PARTIAL}"):  # what a killed run was writing
        stale.unlink()
    total = len(prompts) * per_prompt
    todo = []
    for k in range(total):
        path = image_path(cell, k)
        if path.exists():
            # the size is not known before drawing; it is not among the checked keys
            _check_existing(path, parameters_text(model, prompts[k % len(prompts)], sampler=cell.sampler,
                                                  steps=cell.steps, cfg_scale=cell.cfg_scale, seed=seed + k,
                                                  size=(0, 0)))
        else:
            todo.append(k)
    bar = tqdm(todo, desc=f"generate {cell.name}", unit="img", disable=None if progress else True)
    for k in bar:
        prompt = prompts[k % len(prompts)]
        with torch.no_grad():
            image = model.draw(prompt, sampler=cell.sampler, steps=cell.steps, cfg_scale=cell.cfg_scale,
                               seed=seed + k)
        text = parameters_text(model, prompt, sampler=cell.sampler, steps=cell.steps, cfg_scale=cell.cfg_scale,
                               seed=seed + k, size=image.size)
        save_png(image, image_path(cell, k), text, overwrite=True)  # atomic: whole or absent
    return len(todo), total - len(todo)
