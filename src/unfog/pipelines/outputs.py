"""What the image commands write and read back: generation settings, their text in the PNG
(AUTOMATIC1111's "parameters" format), model hashes, output names that never replace a file, and
a progress bar per image.

The parameters text, as A1111 writes it (and reads it back in its "PNG Info" tab)::

    a lighthouse at dusk, (film grain:1.2)
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

The first lines are the prompt; from a line starting "Negative prompt:" on, the negative prompt
(the line is left out when it is empty); the last line holds ``Key: value`` pairs separated by
", ", where a value containing ",", ":" or a newline is written as a JSON string (``"a, b"``).
Lines are stripped of surrounding spaces on the way back, as A1111 does.

The keys unfog writes and ``--from`` restores: Steps, Sampler (A1111's name where it has one),
Schedule type (Karras, Exponential, SGM Uniform, or unfog's leading / linspace / trailing), CFG
scale, Seed, Size (width x height), Clip skip, Denoising strength (img2img, inpainting), Refiner
switch at; and, to check the model: Model hash (the first 10 hex digits of the file's sha256,
A1111's), Model, Refiner.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image

from ..diffusion import SPACINGS
from ..diffusion.registry import resolve_sampler, valid_names
from .images import save_png

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What an image is made from, besides its models and input images: what its PNG records and
    ``unfog generate --from`` restores. None: the model's default (size, clip skip, spacing).

    sampler: any name ``resolve_sampler`` knows ("DPM++ 2M Karras", "euler_ancestral").
    seed: -1 draws a random one (the one used is recorded).
    strength: img2img / inpainting only (A1111's "Denoising strength").
    refiner_start: the fraction of the steps the base model runs before the SDXL refiner.
    hires, hr_*: txt2img only, A1111's hires fix (``pipelines.hires``): a second pass at hr_scale
        times the size (or hr_resize_x x hr_resize_y) with denoising strength ``strength``.
    masked_content, mask_blur, only_masked, mask_padding: inpainting only (A1111's "Masked
        content", "Mask blur", "Inpaint area: Only masked" and "Masked area padding";
        ``pipelines.masking``); None / 0 / False: the image as it is, the mask as given, the whole
        picture.
    cfg_truncation: the fraction of the steps with classifier-free guidance; the rest run the
        conditional pass alone (1: every step guided).
    deep_cache, deep_cache_branch: DeepCache, the whole U-Net every deep_cache-th evaluation and
        its shallow blocks down to skip level deep_cache_branch in between (1: always the whole).
    deep_cache_start: the fraction of the steps that DeepCache runs in full before it starts
        caching (0: caching from the first step).
    token_merging: ToMe's ratio of tokens merged before the top level's self-attention (A1111's
        "Token merging ratio"; 0: off).
    repaint: inpainting only, RePaint's (jump_length, jump_n_sample) (``diffusion.repaint``; None:
        the per-step blend).
    """

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M Karras"
    spacing: str | None = None
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None
    height: int | None = None
    clip_skip: int | None = None
    strength: float | None = None
    refiner_start: float = 0.8
    masked_content: str | None = None
    mask_blur: int = 0
    only_masked: bool = False
    mask_padding: int = 32
    hires: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str = "Latent"
    hr_steps: int = 0
    hr_sampler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    cfg_truncation: float = 1.0
    deep_cache: int = 1
    deep_cache_branch: int = 0
    deep_cache_start: float = 0.0
    token_merging: float = 0.0
    repaint: tuple[int, int] | None = None

    def hires_pass(self):
        """The hires fix's second pass (``pipelines.hires.Hires``), or None without ``hires``;
        its denoising strength is ``strength`` (default 0.7, A1111's)."""
        if not self.hires:
            return None
        from .hires import Hires

        return Hires(self.hr_upscaler, self.hr_scale, (self.hr_resize_x, self.hr_resize_y), self.hr_steps,
                     0.7 if self.strength is None else self.strength, self.hr_sampler, self.hr_prompt,
                     self.hr_negative_prompt)


SETTINGS_FIELDS = tuple(f.name for f in fields(Settings))
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2^64 - 1
RANDOM_SEED = -1


def check_seed(seed: int, count: int = 1) -> None:
    """A one-line ValueError unless ``seed`` is -1 (random) or in 0..2^64-1 with room for the
    ``count`` seeds ``seed, seed + 1, ...`` of a batch (checked before anything is drawn)."""
    if seed != RANDOM_SEED and not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed {seed} is out of range; valid: -1 (a random one) or 0..{SEED_MAX}")
    if seed != RANDOM_SEED and seed + count - 1 > SEED_MAX:
        raise ValueError(f"seed {seed} with {count} images runs past the largest seed, {SEED_MAX}: the last image "
                         f"would need seed {seed + count - 1}; give a seed <= {SEED_MAX - count + 1}")


def draw_seed(seed: int) -> int:
    """``seed``, or a random one for -1 (below 2^32, as A1111 draws them, so it is short to retype)."""
    import secrets

    return secrets.randbelow(2**32) if seed == RANDOM_SEED else seed


def merge_settings(*layers: Mapping[str, object]) -> Settings:
    """Settings from layers of values, later ones winning (defaults < a PNG's < the command line's)."""
    values = asdict(Settings())
    for layer in layers:
        unknown = set(layer) - set(SETTINGS_FIELDS)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}; valid: {', '.join(SETTINGS_FIELDS)}")
        values.update({k: v for k, v in layer.items() if v is not None})
    return Settings(**values)


# ---------------------------------------------------------------- the parameters text
# A1111's pattern for one "Key: value" pair (modules/infotext_utils.py, re_param_code).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
NEGATIVE = "Negative prompt:"

# A1111's sampler names (its "Sampler" values, the schedule written apart since v1.9).
A1111_SAMPLERS = ("Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
                  "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "LMS", "DDIM", "DDPM", "LCM", "UniPC")
# A1111's "Schedule type" for unfog's spacings; the others are written under their own names.
SCHEDULE_TYPES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform"}


def quote(text: str) -> str:
    """A value as A1111 writes it: as is, or as a JSON string when it holds ",", ":" or a newline."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _text(value: object) -> str:
    """Numbers as short as they stay exact (7.0 -> "7", 0.75 -> "0.75")."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def format_parameters(prompt: str, negative_prompt: str, values: Mapping[str, object]) -> str:
    """The parameters text (see the module docstring); values that are None are left out."""
    pairs = ", ".join(f"{key}: {quote(_text(v))}" for key, v in values.items() if v is not None)
    lines = [prompt] + ([f"{NEGATIVE} {negative_prompt}"] if negative_prompt else []) + [pairs]
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """A parameters text -> ``{"Prompt": ..., "Negative prompt": ..., key: value, ...}``, values as
    strings, quoted ones unquoted (A1111's ``parse_generation_parameters``, without its
    conversions). A last line with fewer than 3 pairs is taken as part of the prompt."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        result[key.strip()] = unquote(value.strip())
    return result


def sampler_name(sampler: str) -> str:
    """The name to record for ``sampler`` (its schedule suffix goes to "Schedule type"): A1111's
    where one means the same function and options, else unfog's (e.g. "uni_pc_bh2")."""
    choice = resolve_sampler(sampler)
    for name in (*A1111_SAMPLERS, *valid_names()):
        other = resolve_sampler(name)
        if (other.name, other.options) == (choice.name, choice.options):
            return name
    return choice.name  # unreachable: every choice comes from one of these names


def schedule_type(spacing: str) -> str:
    return SCHEDULE_TYPES.get(spacing, spacing)


def spacing_of(schedule: str) -> str | None:
    """A1111's "Schedule type" (or an unfog spacing) -> unfog's spacing; "Automatic" -> None."""
    by_name = {v.lower(): k for k, v in SCHEDULE_TYPES.items()} | {s: s for s in SPACINGS}
    key = schedule.strip().lower()
    if key == "automatic":
        return None
    if key not in by_name:
        raise ValueError(f"Schedule type {schedule!r} is not one unfog has; valid: Automatic, "
                         f"{', '.join(SCHEDULE_TYPES.values())}, {', '.join(s for s in SPACINGS if s not in SCHEDULE_TYPES)}"
                         " (or pass --spacing)")
    return by_name[key]


def parse_repaint(text: str, what: str = "--repaint") -> tuple[int, int]:
    """ "10x10" (jump length x jump count, as the PNG key "RePaint" writes it) -> (10, 10)."""
    length, sep, count = text.strip().partition("x")
    if not (sep and length.isdigit() and count.isdigit()):
        raise ValueError(f"{what} must be JUMP_LENGTHxJUMPS, e.g. 10x10, got {text!r}")
    return int(length), int(count)


def settings_from_parameters(params: Mapping[str, str], source: str = "the parameters") -> dict[str, object]:
    """The ``Settings`` fields a parsed parameters text gives (``parse_parameters``), typed."""
    out: dict[str, object] = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    numbers = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
               "Clip skip": ("clip_skip", int), "Denoising strength": ("strength", float),
               "Mask blur": ("mask_blur", int), "Masked area padding": ("mask_padding", int),
               "Hires upscale": ("hr_scale", float), "Hires steps": ("hr_steps", int),
               "Refiner switch at": ("refiner_start", float), "CFG truncation": ("cfg_truncation", float),
               "DeepCache": ("deep_cache", int), "DeepCache branch": ("deep_cache_branch", int),
               "DeepCache start": ("deep_cache_start", float),
               "Token merging ratio": ("token_merging", float)}
    for key, (name, kind) in numbers.items():
        if key in params:
            try:
                out[name] = kind(params[key])
            except ValueError:
                raise ValueError(f"{source}: '{key}: {params[key]}' is not a number") from None
    if "Sampler" in params:
        out["sampler"] = params["Sampler"]
    for key, name in (("Hires upscaler", "hr_upscaler"), ("Hires sampler", "hr_sampler"),
                      ("Hires prompt", "hr_prompt"), ("Hires negative prompt", "hr_negative_prompt")):
        if key in params:
            out[name] = params[key]
    if "Hires resize" in params:
        m = _SIZE.match(params["Hires resize"])
        if m is None:
            raise ValueError(f"{source}: 'Hires resize: {params['Hires resize']}' is not WIDTHxHEIGHT")
        out["hr_resize_x"], out["hr_resize_y"] = int(m.group(1)), int(m.group(2))
    if any(k in params for k in ("Hires upscaler", "Hires upscale", "Hires resize")):
        out["hires"] = True
    if "Masked content" in params:
        out["masked_content"] = params["Masked content"]
    if "RePaint" in params:
        out["repaint"] = parse_repaint(params["RePaint"], f"{source}: 'RePaint'")
    if "Inpaint area" in params:
        out["only_masked"] = params["Inpaint area"].strip().lower() == "only masked"
    if "Schedule type" in params:
        out["spacing"] = spacing_of(params["Schedule type"])
    if "Size" in params:
        m = _SIZE.match(params["Size"])
        if m is None:
            raise ValueError(f"{source}: 'Size: {params['Size']}' is not WIDTHxHEIGHT")
        out["width"], out["height"] = int(m.group(1)), int(m.group(2))
    return out


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelId:
    """How the parameters name a model: the file's name without extension (a folder's name) and
    the first 10 hex digits of the file's sha256 (None for a folder)."""

    name: str
    hash: str | None

    @classmethod
    def of(cls, path: str | Path) -> ModelId:
        path = Path(path)
        if path.is_dir():
            return cls(path.name, None)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return cls(path.stem, digest.hexdigest()[:10])

    def __str__(self) -> str:
        return self.name if self.hash is None else f"{self.name} [{self.hash}]"


# ---------------------------------------------------------------- output files
OUTPUT_FOLDER = Path("outputs")
_NUMBERED = re.compile(r"^(\d+)")


@dataclass(frozen=True)
class OutputTarget:
    """Where images go: numbered files in a folder (``00001-<seed>.png``, the next free number),
    or one named file."""

    path: Path
    folder: bool
    overwrite: bool = False

    @classmethod
    def parse(cls, output: str | Path | None, count: int, overwrite: bool = False) -> OutputTarget:
        """``--output``: None (``./outputs/``), a folder (existing, or a name without extension), or
        a .png file (one image; an existing file only with ``overwrite``)."""
        if output is None:
            return cls(OUTPUT_FOLDER, True)
        path = Path(output)
        if path.is_dir() or (not path.suffix and not path.exists()):
            return cls(path, True)
        if path.suffix.lower() != ".png":
            raise ValueError(f"--output must be a .png file or a folder, got {str(path)!r}")
        if count > 1:
            raise ValueError(f"--output names one file, {path}, but {count} images are asked for; give a folder")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or give a folder")
        return cls(path, False, overwrite)

    def save(self, image: Image.Image, seed: int, parameters: str) -> Path:
        """Write ``image`` with its parameters; in a folder, under the next free number (a file
        that appears meanwhile is never replaced: the number after it is taken)."""
        if not self.folder:
            return save_png(image, self.path, parameters, overwrite=self.overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(1000):
            try:
                return save_png(image, next_free_path(self.path, seed), parameters)
            except FileExistsError:
                continue
        raise FileExistsError(f"found no free file name in {self.path}")


def next_free_path(folder: Path, seed: int) -> Path:
    """``folder/<n>-<seed>.png`` with n one more than the largest number any name there starts with."""
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return folder / f"{max(taken, default=0) + 1:05d}-{seed}.png"


# ---------------------------------------------------------------- progress


class StepProgress:
    """A tqdm bar over the sampler steps of one run; ``callback`` is the sampler's callback. The bar
    opens at the first step, so a run that fails before sampling prints none. tqdm shows it on a
    terminal only (``disable=None``), not in logs."""

    def __init__(self, total: int, desc: str, file=None, disable: bool | None = None):
        self.total, self.desc, self.file, self.disable = total, desc, file, disable
        self.bar = None

    def callback(self, info: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="step", file=self.file, disable=self.disable)
        self.bar.update(1)

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
