"""Drawing one image from loaded models, and the parameters text it carries: the pure core that the
CLI's image commands, ``unfog eval`` and the server share (``unfog.jobs`` loads the models, applies
the adapters a prompt asks for, and writes or sends the images).

Image i of a batch is drawn on its own with seed ``seed + i``, as A1111 seeds a batch, so any
image is reproduced alone from its PNG (``--from``). With an SDXL refiner the base runs the first
``refiner_start`` of the steps and hands its latents to the refiner, on one sigma schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ContextManager, Protocol

from PIL import Image

from ..conditioning import READOUTS, used_embeddings
from ..diffusion.repaint import repaint_calls
from ..models.backbone import kind_of
from ..models.tokenizer import SubVocabTokenizer
from ..prompt_parser import BREAK, parse_prompt_attention
from . import hypernetwork
from .controlnet import Control
from .inputs import check_image_size
from .lora import hashes_text
from .outputs import ModelId, Settings, StepProgress, format_parameters, sampler_name, schedule_type
from .stable_diffusion import StableDiffusion

VERSION_TAG = "unfog"


class Progress(Protocol):
    """What follows one sampling run: made with the run's step count and a description, entered
    around the run; its ``callback`` is the sampler's (``StepProgress`` draws a tqdm bar)."""

    def __call__(self, total: int, desc: str) -> ContextManager: ...


def check_vocabulary(pipe: StableDiffusion, s: Settings, warn: Callable[[str], None]) -> None:
    """Models trained from scratch on a closed caption set know only its words: say which are not
    (the names of loaded embeddings, e.g. a LoRA's new words, are known: they get their vectors)."""
    if not isinstance(pipe.tokenizer, SubVocabTokenizer):
        return
    texts = (prompt_words(s.prompt), prompt_words(s.negative_prompt))  # what is encoded, without the syntax
    named = {w for e in pipe.embeddings for w in pipe.tokenizer.unknown_words(e.name)}
    unknown = sorted({w for text in texts for w in pipe.tokenizer.unknown_words(text)} - named)
    if unknown:
        warn(f"outside this model's training domain: {', '.join(unknown)} (never seen in its captions, so they "
             "read as one 'unknown' token); the image is drawn anyway")


def prompt_words(prompt: str) -> str:
    """The words a prompt encodes: its text without the emphasis syntax and BREAKs (``prompt_parser``)."""
    return " ".join(word for seg in parse_prompt_attention(prompt) if seg is not BREAK for word in seg.text.split())


# A request is "far" from the size a model was trained at (its default size) when a side is under
# half of it, or the image has more than FAR_PIXELS times its pixels.
FAR_PIXELS = 4


def check_size(pipe: StableDiffusion, width: int, height: int, warn: Callable[[str], None]) -> None:
    """Warn before drawing an image far from the size the model was trained at: a small one comes
    out poor; for a large one, estimate its cost against the trained size. Time grows at least as
    the pixels (the convolutions; attention grows faster); memory at least as the U-Net's
    full-resolution activations: a CFG pair of its first level's channels at the latent size, one
    for each skip connection of that level and two being worked on."""
    check_image_size(width, height, pipe.size_multiple)  # a size that cannot be drawn is an error, not a warning
    side = pipe.default_size
    trained = f"{side}x{side}"
    if kind_of(pipe.unet) == "dit" and (width, height) != (side, side):
        raise ValueError(f"this model's DiT draws {trained} only (its position table is fixed to that size), "
                         f"not {width}x{height}")
    if min(width, height) < side / 2:
        warn(f"this model was trained at {trained}; {width}x{height} is under half of that, so expect a poor image")
    ratio = width * height / side**2
    if ratio > FAR_PIXELS:
        f, cfg = pipe.size_multiple, pipe.unet.config
        element = next(pipe.unet.parameters()).element_size()
        kept = cfg.num_res_blocks + 1 + 2  # the first level's skips, and two tensors being worked on
        gib = 2 * cfg.model_channels * (width // f) * (height // f) * element * kept / 2**30
        warn(f"this model was trained at {trained}; {width}x{height} has {ratio:.0f} times its pixels: each step "
             f"takes at least {ratio:.0f} times as long as at {trained} (attention grows faster), and the U-Net "
             f"needs at least {gib:.1f} GiB of memory; the image is drawn anyway (Ctrl-C stops it)")


def parameters(pipe: StableDiffusion, s: Settings, model: ModelId, refiner: ModelId | None,
               control_units: tuple[str, ...] | list[str] = (), vae: ModelId | None = None) -> str:
    """The parameters text of an image drawn by ``pipe`` with settings ``s`` (size and seed final),
    with the ControlNet units' texts (``control_units.unit_text``) and the VAE loaded in place of
    the model's (``vae``; A1111 names it by its file name with the extension)."""
    from .. import __version__

    clip_skip = s.clip_skip or READOUTS[pipe.family][0].clip_skip
    values = {
        "Steps": s.steps, "Sampler": sampler_name(s.sampler),
        "Schedule type": schedule_type(pipe.spacing_for(s.sampler, s.spacing)), "CFG scale": s.cfg_scale,
        "CFG truncation": s.cfg_truncation if s.cfg_truncation < 1 else None,
        "DeepCache": s.deep_cache if s.deep_cache > 1 else None,
        "DeepCache branch": s.deep_cache_branch if s.deep_cache > 1 and s.deep_cache_branch else None,
        "DeepCache start": s.deep_cache_start if s.deep_cache > 1 and s.deep_cache_start else None,
        "Token merging ratio": s.token_merging or None,
        "RePaint": s.repaint and f"{s.repaint[0]}x{s.repaint[1]}",
        "Seed": s.seed, "Size": f"{s.width}x{s.height}", "Model hash": model.hash, "Model": model.name,
        "VAE hash": vae and vae.hash, "VAE": vae and pipe.vae_file.name,
        "Denoising strength": s.strength, "Clip skip": clip_skip,
        **_inpainting_values(s), **_hires_values(s),
        "Refiner": refiner and str(refiner), "Refiner switch at": refiner and s.refiner_start,
        "Cascade": cascade_text(pipe),
        "Lora hashes": hashes_text(pipe.loras) or None,
        "TI hashes": ti_hashes_text(pipe, s) or None,
        "Hypernet hashes": hypernetwork.hashes_text(pipe.hypernetworks) or None,
        **{f"ControlNet {i}": text for i, text in enumerate(control_units)},
        "Version": f"{VERSION_TAG} {__version__}",
    }
    return format_parameters(s.prompt, s.negative_prompt, values)


def cascade_text(pipe: StableDiffusion) -> str | None:
    """A cascade's second stage, for the parameters (unfog's key; the file carries these settings)."""
    if pipe.super_resolution is None:
        return None
    s, side = pipe.super_resolution_settings, pipe.super_resolution.default_size
    return (f"{side}x{side} {sampler_name(s.sampler)} {s.steps} steps CFG {s.cfg_scale} "
            f"noise augmentation {s.noise_augmentation}")


def _inpainting_values(s: Settings) -> dict[str, object]:
    """A1111's inpainting keys, written where they differ from its defaults (an inpainting run's
    settings carry ``masked_content``; others write none)."""
    if s.masked_content is None:
        return {}
    values: dict[str, object] = {"Mask blur": s.mask_blur or None}
    if s.masked_content != "original":
        values["Masked content"] = s.masked_content
    if s.only_masked:
        values |= {"Inpaint area": "Only masked", "Masked area padding": s.mask_padding}
    return values


def _hires_values(s: Settings) -> dict[str, object]:
    """A1111's hires-fix keys (``Denoising strength`` is written with the others)."""
    if not s.hires:
        return {}
    resized = s.hr_resize_x or s.hr_resize_y
    return {"Hires upscale": None if resized else s.hr_scale,
            "Hires resize": f"{s.hr_resize_x}x{s.hr_resize_y}" if resized else None,
            "Hires steps": s.hr_steps or None, "Hires upscaler": s.hr_upscaler,
            "Hires sampler": s.hr_sampler and sampler_name(s.hr_sampler),
            "Hires prompt": s.hr_prompt if s.hr_prompt not in (None, s.prompt) else None,
            "Hires negative prompt": s.hr_negative_prompt if s.hr_negative_prompt not in (None, s.negative_prompt)
            else None}


def draw(pipe: StableDiffusion, refiner: StableDiffusion | None, s: Settings, init, mask, desc: str,
         controls: list[Control] = (), warn: Callable[[str], None] | None = None,
         progress: Progress = StepProgress) -> Image.Image:
    """One image of settings ``s`` (size and seed final; prompts without adapter tags): the base
    alone, or the base then the refiner on the same sigmas (the ControlNets act on the base's
    steps, as in A1111). ``init`` / ``mask``: img2img and inpainting inputs of the image's size."""
    spacing = pipe.spacing_for(s.sampler, s.spacing)  # the refiner must step on the base's schedule
    common = dict(steps=s.steps, sampler=s.sampler, spacing=spacing, cfg_scale=s.cfg_scale, seed=s.seed,
                  clip_skip=s.clip_skip, **savings(s))
    inputs = dict(width=s.width, height=s.height)
    if init is not None:
        inputs |= dict(init_image=init, mask=mask, strength=s.strength)
    if mask is not None:
        inputs["masked_content"] = s.masked_content or "original"
        if s.repaint is not None:
            inputs["repaint"] = tuple(s.repaint)
    end = None if refiner is None else s.refiner_start
    hires = s.hires_pass()
    if pipe.super_resolution is not None and (hires is not None or refiner is not None):
        raise ValueError("this cascade's second stage draws the large image: hires fix and a refiner do not apply")
    steps = len(pipe.sigmas(s.steps, s.sampler, spacing, strength=inputs.get("strength"), denoising_end=end)) - 1
    if "repaint" in inputs:  # the model calls of RePaint's schedule
        steps = repaint_calls(s.steps, *s.repaint, pipe.schedule.num_timesteps)
    if pipe.super_resolution is not None:  # a cascade: the second stage reports on the same bar
        steps += pipe.super_resolution_settings.steps
    with progress(steps, desc) as bar:
        out = pipe(s.prompt, s.negative_prompt, **common, **inputs, denoising_end=end, controls=controls, warn=warn,
                   output="pil" if refiner is None and hires is None else "latent", callback=bar.callback)
    if hires is not None:
        return _hires_pass(pipe, s, hires, out, controls, desc, progress)
    if refiner is None:
        return out[0]
    steps = len(refiner.sigmas(s.steps, s.sampler, spacing, denoising_start=end)) - 1
    with progress(steps, desc + " (refiner)") as bar:
        return refiner(s.prompt, s.negative_prompt, **common, latents=out, denoising_start=end,
                       callback=bar.callback)[0]


def savings(s: Settings) -> dict[str, object]:
    """The pipeline's opt-in savings of U-Net work that ``s`` asks for (every pass)."""
    return dict(cfg_truncation=s.cfg_truncation, deep_cache=s.deep_cache, deep_cache_branch=s.deep_cache_branch,
                deep_cache_start=s.deep_cache_start, token_merging=s.token_merging)


def ti_hashes_text(pipe: StableDiffusion, s: Settings) -> str:
    """The value A1111 writes as ``TI hashes``: ``"name: hash, ..."`` for each embedding the prompts
    use, its name without ":" and ",", the file's 12-digit sha256."""
    used = used_embeddings([s.prompt, s.negative_prompt], pipe.tokenizer, pipe.embeddings)
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash}" for e in used if e.short_hash)


def _hires_pass(pipe: StableDiffusion, s: Settings, hires, first, controls, desc: str,
                progress: Progress) -> Image.Image:
    """Hires fix's second pass over the first pass's latents ``first``: upscaled as latents, or
    decoded, resized and encoded again; then img2img at the larger size with the hires strength,
    on the same seed, the ControlNets acting again (their hints fitted to the new size)."""
    from .hires import LATENT_UPSCALERS, target_size, upscale_image, upscale_latents
    from .inputs import to_pil

    width, height = target_size(s.width, s.height, hires, pipe.size_multiple)
    sampler = hires.sampler or s.sampler
    steps = hires.steps or s.steps
    spacing = pipe.spacing_for(sampler, s.spacing if hires.sampler is None else None)
    start = {}
    f = pipe.size_multiple
    if hires.upscaler in LATENT_UPSCALERS:
        start["init_latents"] = upscale_latents(first, (height // f, width // f), hires.upscaler)
    else:
        start["init_image"] = upscale_image(to_pil(pipe.decode(first))[0], (width, height), hires.upscaler)
    prompt = s.prompt if hires.prompt is None else hires.prompt
    negative = s.negative_prompt if hires.negative_prompt is None else hires.negative_prompt
    total = len(pipe.sigmas(steps, sampler, spacing, strength=hires.strength)) - 1
    with progress(total, desc + " (hires)") as bar:
        return pipe(prompt, negative, steps=steps, sampler=sampler, spacing=spacing, cfg_scale=s.cfg_scale,
                    **savings(s), seed=s.seed, clip_skip=s.clip_skip, width=width, height=height, strength=hires.strength,
                    controls=controls, callback=bar.callback, **start)[0]
