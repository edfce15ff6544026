"""A generation job: what to draw, from which model files and images, and where to; the settings
layered from defaults, the model's recommendations, a ``--from`` PNG and what was typed; and the
mistakes found before anything is loaded."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from ..diffusion import SPACINGS, resolve_sampler
from ..diffusion.schedules import check_choice
from ..pipelines.control_units import ControlSpec
from ..pipelines.controlnet import check_unit
from ..pipelines.images import open_image, read_parameters
from ..pipelines.inputs import MASKED_CONTENT
from ..pipelines.latent_model import recommended_settings
from ..pipelines.outputs import Settings, check_seed, merge_settings, parse_parameters, settings_from_parameters
from ..pipelines.compiled import COMPILE_MODES
from ..pipelines.precision import DTYPE_NAMES

Mode = Literal["txt2img", "img2img", "inpaint"]
DEFAULT_STRENGTH = 0.75


@dataclass(frozen=True)
class Job:
    """One command: what to draw (``settings``), from which models and images, and where to.
    ``source``: the parsed parameters of a ``--from`` PNG, to compare its models with these."""

    mode: Mode
    settings: Settings
    model: Path
    init: Path | Image.Image | None = None  # a file, or an image in memory (the server's)
    mask: Path | Image.Image | None = None
    refiner: Path | None = None
    family: str | None = None
    prediction: str | None = None
    dtype: str = "auto"  # "auto" (pipelines.precision.auto_dtype), "fp32", "bf16" or "fp16"
    compile: str = "off"  # torch.compile of the U-Net and VAE decoder: "off", "auto", "strict" (pipelines.compiled)
    device: str | None = None
    batch_size: int = 1
    output: str | None = None
    overwrite: bool = False
    source: dict[str, str] | None = None
    lora_dirs: tuple[Path, ...] = ()
    embedding_dirs: tuple[Path, ...] = ()
    hypernetwork_dirs: tuple[Path, ...] = ()
    controls: tuple[ControlSpec, ...] = ()
    control_mode: str = "balanced"
    control_resize: str = "just_resize"
    controlnet_dirs: tuple[Path, ...] = ()
    hints: tuple[Path, ...] = ()
    preprocess: tuple[str, ...] = ()
    vae: Path | None = None


def resolve_settings(mode: Mode, given: dict[str, object], from_png: str | Path | None,
                     warn: Callable[[str], None], model: str | Path | None = None
                     ) -> tuple[Settings, dict[str, str] | None]:
    """The settings of a command: defaults, then the settings the ``model`` file recommends (unfog's
    own text-to-image models store them), then those of the ``from_png`` image, then ``given``
    (the options typed); with the PNG's parsed parameters."""
    source, restored = None, {}
    if from_png is not None:
        text = read_parameters(from_png)
        if text is None:
            raise ValueError(f"{from_png} carries no generation parameters (no 'parameters' text chunk)")
        source = parse_parameters(text)
        usable = {k: v for k, v in source.items() if not (k == "Schedule type" and given.get("spacing"))}
        restored = settings_from_parameters(usable, str(from_png))
        if mode == "txt2img" and not restored.get("hires") and restored.pop("strength", None) is not None:
            warn(f"{from_png} was made by img2img or inpainting (it has a Denoising strength); generate ignores it")
        if mode != "txt2img":  # hires fix is txt2img's
            restored = {k: v for k, v in restored.items() if not k.startswith("hr") and k != "hires"}
        if mode != "inpaint":  # an inpainting PNG's mask settings mean nothing without a mask
            for name in ("masked_content", "mask_blur", "only_masked", "mask_padding", "repaint"):
                restored.pop(name, None)
    defaults = {"strength": DEFAULT_STRENGTH} if mode != "txt2img" else {}
    recommended = {} if model is None else recommended_settings(model)
    settings = merge_settings(defaults, recommended, restored, given)
    if given.get("prompt") is None and from_png is None:
        raise ValueError("give a PROMPT, or --from IMAGE.png to take it from an image")
    return settings, source


def check(job: Job) -> None:
    """The mistakes that can be found before loading anything, each a one-line ValueError."""
    s = job.settings
    resolve_sampler(s.sampler)
    if s.spacing is not None:
        check_choice("sigma spacing", s.spacing, SPACINGS)
    check_choice("dtype", job.dtype, DTYPE_NAMES)
    check_choice("compile mode", job.compile, COMPILE_MODES)
    check_seed(s.seed, job.batch_size)
    if not math.isfinite(s.cfg_scale):
        raise ValueError(f"CFG scale must be a finite number, got {s.cfg_scale}")
    if not 0 <= s.cfg_truncation <= 1:
        raise ValueError(f"--cfg-truncation must be in [0, 1] (the fraction of the steps guided), got {s.cfg_truncation}")
    if s.repaint is not None and job.mode != "inpaint":
        raise ValueError("--repaint is an inpainting method: use unfog inpaint --init IMAGE --mask MASK")
    if not 0 <= s.token_merging < 1:
        raise ValueError(f"--token-merging must be in [0, 1) (the fraction of tokens merged), got {s.token_merging}")
    if s.deep_cache < 1 or s.deep_cache_branch < 0:
        raise ValueError(f"--deep-cache must be >= 1 (1: off) and --deep-cache-branch >= 0, got {s.deep_cache} and "
                         f"{s.deep_cache_branch}")
    if not 0 <= s.deep_cache_start < 1:
        raise ValueError(f"--deep-cache-start must be in [0, 1) (the fraction of the steps run in full first), got "
                         f"{s.deep_cache_start}")
    for name, value in (("steps", s.steps), ("batch size", job.batch_size), ("clip skip", s.clip_skip),
                        ("width", s.width), ("height", s.height)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if job.mode == "txt2img" and (job.init or job.mask):
        raise ValueError("generate takes no init image or mask; use img2img or inpaint")
    if s.masked_content is not None:
        check_choice("masked content", s.masked_content, MASKED_CONTENT)
    if job.mode != "inpaint" and (s.masked_content not in (None, "original") or s.only_masked or s.mask_blur):
        raise ValueError("masked content, mask blur and only-masked are inpainting settings; use inpaint --mask")
    if s.mask_blur < 0 or s.mask_padding < 0:
        raise ValueError(f"mask blur and masked area padding must be >= 0, got {s.mask_blur} and {s.mask_padding}")
    if s.hires:
        if job.mode != "txt2img":
            raise ValueError("hires fix is for generate (txt2img); img2img and inpaint draw at the size asked")
        if job.refiner is not None:
            raise ValueError("hires fix and --refiner together are not supported; use one of them")
        s.hires_pass()  # its values checked (upscaler, scale, strength)
        if s.hr_sampler is not None:
            resolve_sampler(s.hr_sampler)
    elif job.mode == "txt2img" and s.strength is not None:
        raise ValueError("--strength is img2img's and inpaint's, or hires fix's (--hires) denoising strength")
    if job.mode != "txt2img" and not 0 < s.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {s.strength}")
    if job.refiner is not None and job.mode == "inpaint":
        raise ValueError("--refiner works with generate and img2img, not inpaint")
    if job.refiner is not None and not 0 < s.refiner_start < 1:
        raise ValueError(f"--refiner-start must be in (0, 1), got {s.refiner_start}")
    files = [p if not isinstance(p, Image.Image) else None for p in (job.init, job.mask)]
    for what, path in (("model", job.model), ("refiner", job.refiner), ("init image", files[0]), ("mask", files[1]),
                       ("VAE", job.vae)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{what} not found: {path}")
    check_unit(1.0, 0.0, 1.0, job.control_resize, job.control_mode)
    if len(job.preprocess) > 1 and len(job.preprocess) != len(job.controls):
        raise ValueError(f"--preprocess is given {len(job.preprocess)} times for {len(job.controls)} --control units; "
                         "give it once (for every unit) or once per unit")
    for hint in job.hints:
        if not Path(hint).is_file():
            raise FileNotFoundError(f"ControlNet hint image not found: {hint}")


def input_images(job: Job) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image (RGB) and mask (greyscale) of img2img / inpainting, which must match in size."""
    if job.mode == "txt2img":
        return None, None
    if job.init is None:
        raise ValueError(f"{'img2img' if job.mode == 'img2img' else 'inpaint'} needs --init IMAGE")
    if job.mode == "inpaint" and job.mask is None:
        raise ValueError("inpaint needs --mask MASK (white = repaint, black = keep)")
    init = _image(job.init, "init image").convert("RGB")
    mask = None if job.mask is None else _image(job.mask, "mask").convert("L")
    if mask is not None and mask.size != init.size:
        raise ValueError(f"the mask {_name(job.mask)} is {mask.width}x{mask.height} but the init image "
                         f"{_name(job.init)} is {init.width}x{init.height} (width x height); give a mask of the "
                         "image's size")
    return init, mask


def _image(value: Path | Image.Image, what: str) -> Image.Image:
    return value if isinstance(value, Image.Image) else open_image(value, what)


def _name(value: Path | Image.Image) -> str:
    return "given" if isinstance(value, Image.Image) else str(value)
