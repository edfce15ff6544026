"""The image commands' work (``unfog generate | img2img | inpaint``): check the inputs, load the
models, draw each image with a progress bar, and save it as a PNG carrying its parameters.

Image i of a batch is drawn on its own with seed ``seed + i``, as A1111 seeds a batch, so any
image is reproduced alone from its PNG (``--from``). With an SDXL refiner the base runs the first
``refiner_start`` of the steps and hands its latents to the refiner, on one sigma schedule.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from PIL import Image

from ..checkpoint.embeddings import EMBEDDING_SUFFIXES
from ..conditioning import READOUTS, used_embeddings
from ..diffusion import SPACINGS, resolve_sampler
from ..diffusion.schedules import check_choice
from ..models.tokenizer import SubVocabTokenizer
from ..prompt_parser import BREAK, parse_prompt_attention
from .images import open_image, read_parameters
from .inputs import check_image_size
from .precision import DTYPES, resolve_device
from .latent_model import recommended_settings
from . import hypernetwork
from .control_units import (ControlSpec, find_controlnet, model_title, preprocessor, recorded_hash, recorded_units,
                            spec_from_unit, unit_text)
from .controlnet import Control, check_unit
from .lora import extract_lora_tags, find_lora, hashes_text, parse_hashes
from .outputs import (ModelId, OutputTarget, Settings, StepProgress, check_seed, draw_seed, format_parameters,
                      merge_settings, parse_parameters, sampler_name, schedule_type, settings_from_parameters)
from .stable_diffusion import StableDiffusion

Mode = Literal["txt2img", "img2img", "inpaint"]
DEFAULT_STRENGTH = 0.75
VERSION_TAG = "unfog"


@dataclass(frozen=True)
class Job:
    """One command: what to draw (``settings``), from which models and images, and where to.
    ``source``: the parsed parameters of a ``--from`` PNG, to compare its models with these."""

    mode: Mode
    settings: Settings
    model: Path
    init: Path | None = None
    mask: Path | None = None
    refiner: Path | None = None
    family: str | None = None
    prediction: str | None = None
    dtype: str = "fp32"
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
        if mode == "txt2img" and restored.pop("strength", None) is not None:
            warn(f"{from_png} was made by img2img or inpainting (it has a Denoising strength); generate ignores it")
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
    check_choice("dtype", job.dtype, tuple(DTYPES))
    check_seed(s.seed, job.batch_size)
    if not math.isfinite(s.cfg_scale):
        raise ValueError(f"CFG scale must be a finite number, got {s.cfg_scale}")
    for name, value in (("steps", s.steps), ("batch size", job.batch_size), ("clip skip", s.clip_skip),
                        ("width", s.width), ("height", s.height)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if job.mode == "txt2img" and (job.init or job.mask):
        raise ValueError("generate takes no init image or mask; use img2img or inpaint")
    if job.mode != "txt2img" and not 0 < s.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {s.strength}")
    if job.refiner is not None and job.mode == "inpaint":
        raise ValueError("--refiner works with generate and img2img, not inpaint")
    if job.refiner is not None and not 0 < s.refiner_start < 1:
        raise ValueError(f"--refiner-start must be in (0, 1), got {s.refiner_start}")
    for what, path in (("model", job.model), ("refiner", job.refiner), ("init image", job.init), ("mask", job.mask),
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


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run(job: Job, warn: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Draw and save the job's images; yields each file as it is written."""
    check(job)
    target = OutputTarget.parse(job.output, job.batch_size, job.overwrite)
    init, mask = _input_images(job)
    device = resolve_device(job.device)
    load = dict(dtype=DTYPES[job.dtype], device=device, prediction=job.prediction)
    pipe = StableDiffusion.load(job.model, family=job.family, **load)
    if pipe.inpainting_unet and job.mode != "inpaint":
        raise ValueError(f"{job.model} is an inpainting model (9 input channels): use unfog inpaint --init IMAGE "
                         "--mask MASK")
    if job.vae is not None:
        pipe.load_vae(job.vae)
    refiner = None if job.refiner is None else _load_refiner(pipe, job.refiner, load)
    model_id, refiner_id = ModelId.of(job.model), job.refiner and ModelId.of(job.refiner)
    vae_id = job.vae and ModelId.of(job.vae)
    _compare_models(job, model_id, refiner_id, warn, vae_id)
    s = job.settings
    encoded = _apply_loras(pipe, s, job, warn)  # the prompts without their <lora:…> tags
    encoded = _apply_hypernetworks(pipe, encoded, job, warn)  # nor their <hypernet:…> tags
    _load_embeddings(pipe, refiner, encoded, job.embedding_dirs, warn)
    _check_vocabulary(pipe, encoded, warn)
    controls, unit_texts = _load_controls(pipe, job, load, warn)

    seed = draw_seed(s.seed)
    width = s.width or (init.width if init else pipe.default_size)
    height = s.height or (init.height if init else pipe.default_size)
    _check_size(pipe, width, height, warn)
    if init is not None and init.size != (width, height):
        init = init.resize((width, height), Image.LANCZOS)
        mask = None if mask is None else mask.resize((width, height), Image.NEAREST)
    for i in range(job.batch_size):
        one = replace(s, seed=seed + i, width=width, height=height)
        drawn = replace(encoded, seed=one.seed, width=width, height=height)
        image = _draw(pipe, refiner, drawn, init, mask, f"image {i + 1}/{job.batch_size}", controls,
                      warn if i == 0 else None)  # a resized hint is said once
        yield target.save(image, one.seed, parameters(pipe, one, model_id, refiner_id, unit_texts, vae_id))


def _check_vocabulary(pipe: StableDiffusion, s: Settings, warn: Callable[[str], None]) -> None:
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


def _check_size(pipe: StableDiffusion, width: int, height: int, warn: Callable[[str], None]) -> None:
    """Warn before drawing an image far from the size the model was trained at: a small one comes
    out poor; for a large one, estimate its cost against the trained size. Time grows at least as
    the pixels (the convolutions; attention grows faster); memory at least as the U-Net's
    full-resolution activations: a CFG pair of its first level's channels at the latent size, one
    for each skip connection of that level and two being worked on."""
    check_image_size(width, height, pipe.size_multiple)  # a size that cannot be drawn is an error, not a warning
    side = pipe.default_size
    trained = f"{side}x{side}"
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
        "Seed": s.seed, "Size": f"{s.width}x{s.height}", "Model hash": model.hash, "Model": model.name,
        "VAE hash": vae and vae.hash, "VAE": vae and pipe.vae_file.name,
        "Denoising strength": s.strength, "Clip skip": clip_skip,
        "Refiner": refiner and str(refiner), "Refiner switch at": refiner and s.refiner_start,
        "Lora hashes": hashes_text(pipe.loras) or None,
        "TI hashes": ti_hashes_text(pipe, s) or None,
        "Hypernet hashes": hypernetwork.hashes_text(pipe.hypernetworks) or None,
        **{f"ControlNet {i}": text for i, text in enumerate(control_units)},
        "Version": f"{VERSION_TAG} {__version__}",
    }
    return format_parameters(s.prompt, s.negative_prompt, values)


def _draw(pipe: StableDiffusion, refiner: StableDiffusion | None, s: Settings, init, mask, desc: str,
          controls: list[Control] = (), warn: Callable[[str], None] | None = None) -> Image.Image:
    """One image: the base alone, or the base then the refiner on the same sigmas (the ControlNets
    act on the base's steps, as in A1111)."""
    spacing = pipe.spacing_for(s.sampler, s.spacing)  # the refiner must step on the base's schedule
    common = dict(steps=s.steps, sampler=s.sampler, spacing=spacing, cfg_scale=s.cfg_scale, seed=s.seed,
                  clip_skip=s.clip_skip)
    inputs = dict(width=s.width, height=s.height)
    if init is not None:
        inputs |= dict(init_image=init, mask=mask, strength=s.strength)
    end = None if refiner is None else s.refiner_start
    steps = len(pipe.sigmas(s.steps, s.sampler, spacing, strength=inputs.get("strength"), denoising_end=end)) - 1
    with StepProgress(steps, desc) as bar:
        out = pipe(s.prompt, s.negative_prompt, **common, **inputs, denoising_end=end, controls=controls, warn=warn,
                   output="pil" if refiner is None else "latent", callback=bar.callback)
    if refiner is None:
        return out[0]
    steps = len(refiner.sigmas(s.steps, s.sampler, spacing, denoising_start=end)) - 1
    with StepProgress(steps, desc + " (refiner)") as bar:
        return refiner(s.prompt, s.negative_prompt, **common, latents=out, denoising_start=end,
                       callback=bar.callback)[0]


def _load_embeddings(pipe: StableDiffusion, refiner: StableDiffusion | None, s: Settings, folders: tuple[Path, ...],
                     warn: Callable[[str], None]) -> None:
    """Load the embedding files of ``folders`` (searched recursively, as A1111 does) whose names,
    their file stems, occur in the prompt or negative prompt (matched on CLIP ids, as in the prompt
    itself), into the base and the refiner. Reading only those keeps a large folder cheap."""
    texts = [tuple(pipe.tokenizer.encode_clip(prompt_words(t))) for t in (s.prompt, s.negative_prompt)]
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"--embeddings-dir {folder} is not a folder")
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file():
                continue
            ids = tuple(pipe.tokenizer.encode_clip(path.stem))
            if ids and any(_contains(text, ids) for text in texts):
                for target in (pipe, refiner):
                    if target is not None:
                        target.load_embedding(path, warn=warn)
    known = {e.name.lower() for e in pipe.embeddings}
    written = {m for t in (s.prompt, s.negative_prompt) for m in _NAME_LIKE.findall(t)}
    unmatched = sorted((m for m in written if m.lower() not in known), key=str.lower)
    if unmatched:  # "<sks>" is meant as an embedding's name; any other word may just be a word
        where = f"in {', '.join(map(str, folders))}" if folders else "(no --embeddings-dir given)"
        warn(f"{', '.join(unmatched)}: no embedding of that name {where}; the prompt keeps it as plain text")


# a word in angle brackets, as textual-inversion names are usually written ("<sks>"); not a
# <lora:…> / <hypernet:…> tag, which holds a colon and is gone from the prompt by now
_NAME_LIKE = re.compile(r"<[^<>:\s]+>")


def _contains(seq: tuple[int, ...], part: tuple[int, ...]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def ti_hashes_text(pipe: StableDiffusion, s: Settings) -> str:
    """The value A1111 writes as ``TI hashes``: ``"name: hash, ..."`` for each embedding the prompts
    use, its name without ":" and ",", the file's 12-digit sha256."""
    used = used_embeddings([s.prompt, s.negative_prompt], pipe.tokenizer, pipe.embeddings)
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash}" for e in used if e.short_hash)


def _apply_loras(pipe: StableDiffusion, s: Settings, job: Job, warn: Callable[[str], None]) -> Settings:
    """Merge the LoRAs the prompt's ``<lora:NAME:W>`` tags ask for (found in ``job.lora_dirs``);
    with ``--from``, check each against the hash its PNG recorded. Returns the settings with the
    tags taken out of both prompts, as the text encoder must see them (A1111 applies the tags of
    the prompt; those of the negative prompt are removed and ignored)."""
    prompt, tags = extract_lora_tags(s.prompt)
    negative, ignored = extract_lora_tags(s.negative_prompt)
    if ignored:
        warn(f"LoRA tags in the negative prompt are ignored: {', '.join(t.name for t in ignored)}")
    recorded = parse_hashes((job.source or {}).get("Lora hashes", ""))
    for tag in tags:
        path = find_lora(tag.name, job.lora_dirs)
        applied = pipe.load_lora(path, tag.weight, tag.text_encoder_weight, name=tag.name, warn=warn)
        if tag.name in recorded and recorded[tag.name].lower() != applied.hash:
            raise ValueError(f"the image was made with LoRA {tag.name} [{recorded[tag.name]}], but {path} has hash "
                             f"{applied.hash}: it is another file (put the one with that hash in --lora-dir)")
    return replace(s, prompt=prompt, negative_prompt=negative)


def _apply_hypernetworks(pipe: StableDiffusion, s: Settings, job: Job, warn: Callable[[str], None]) -> Settings:
    """Apply the hypernetworks the prompt's ``<hypernet:NAME:W>`` tags ask for (found in
    ``job.hypernetwork_dirs``), checked against the hashes a ``--from`` PNG recorded; returns the
    settings without those tags (those of the negative prompt are removed and ignored, as in A1111)."""
    prompt, tags = hypernetwork.extract_hypernet_tags(s.prompt)
    negative, ignored = hypernetwork.extract_hypernet_tags(s.negative_prompt)
    if ignored:
        warn(f"hypernetwork tags in the negative prompt are ignored: {', '.join(t.name for t in ignored)}")
    recorded = parse_hashes((job.source or {}).get("Hypernet hashes", ""))
    for tag in tags:
        path = hypernetwork.find_hypernetwork(tag.name, job.hypernetwork_dirs)
        applied = pipe.load_hypernetwork(path, tag.weight, name=tag.name)
        if tag.name in recorded and recorded[tag.name].lower() != applied.hash:
            raise ValueError(f"the image was made with hypernetwork {tag.name} [{recorded[tag.name]}], but {path} has "
                             f"hash {applied.hash}: it is another file (put the one with that hash in "
                             "--hypernetwork-dir)")
    return replace(s, prompt=prompt, negative_prompt=negative)


def _control_specs(job: Job, warn: Callable[[str], None]) -> list[tuple[ControlSpec, str | None]]:
    """The units to apply, each with the model hash a ``--from`` PNG recorded for it (or None): the
    ``--control`` units typed, else the PNG's units with the ``--hint`` images, in order."""
    if job.controls:
        if job.hints:
            raise ValueError("--hint gives the hint images of a --from PNG's ControlNet units; with --control, put "
                             "each image in its --control MODEL:IMAGE")
        names = list(job.preprocess) * len(job.controls) if len(job.preprocess) == 1 else list(job.preprocess)
        specs = [replace(c, module=name) for c, name in zip(job.controls, names)] if names else list(job.controls)
        return [(c, None) for c in specs]
    units = recorded_units(job.source or {})
    if job.preprocess:
        raise ValueError("--preprocess applies to --control units; give --control MODEL:IMAGE")
    if not units:
        if job.hints:
            raise ValueError("--hint needs --from IMAGE.png made with ControlNet units (this one has none)")
        return []
    if not job.hints:
        warn(f"the image was made with {len(units)} ControlNet unit(s); give their hint images with --hint (and the "
             "models' folder with --controlnet-dir) to apply them; drawing without")
        return []
    if len(job.hints) != len(units):
        raise ValueError(f"the image was made with {len(units)} ControlNet unit(s) but {len(job.hints)} --hint "
                         "image(s) are given; give one per unit, in order")
    return [(spec_from_unit(u, h, f"ControlNet {i}"), recorded_hash(u)) for i, (u, h) in enumerate(zip(units, job.hints))]


def _load_controls(pipe: StableDiffusion, job: Job, load: dict, warn: Callable[[str], None]
                   ) -> tuple[list[Control], list[str]]:
    """The job's ControlNet units, loaded and checked against ``pipe``, and their parameters texts."""
    from .. import load_controlnet
    from ..checkpoint.controlnet import NeedsBase, check_controlnet_family

    controls, texts = [], []
    for spec, expected in _control_specs(job, warn):
        path = find_controlnet(spec.model, job.controlnet_dirs)
        title = model_title(path)
        if expected is not None and title.rsplit(" [", 1)[1].rstrip("]") != expected:
            raise ValueError(f"the image was made with ControlNet {spec.model} [{expected}], but {path} has hash "
                             f"{title.rsplit(' [', 1)[1]}: it is another file (put the one with that hash in "
                             "--controlnet-dir)")
        try:
            model = load_controlnet(path, dtype=load["dtype"], device=load["device"])
        except NeedsBase:
            model = load_controlnet(path, base=pipe.unet, dtype=load["dtype"], device=load["device"])
        try:
            check_controlnet_family(model, pipe.unet)
        except ValueError as err:
            raise ValueError(f"ControlNet {path}: {err}") from None
        image = open_image(spec.image, "ControlNet hint").convert("RGB")
        fn = preprocessor(spec.module)
        if fn is not None:
            image = fn(image)
        resize, mode = spec.resize_mode or job.control_resize, spec.control_mode or job.control_mode
        controls.append(Control(model, image, spec.weight, spec.start, spec.end, resize, mode))
        texts.append(unit_text(spec, title, resize, mode))
    return controls, texts


def _input_images(job: Job) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image (RGB) and mask (greyscale) of img2img / inpainting, which must match in size."""
    if job.mode == "txt2img":
        return None, None
    if job.init is None:
        raise ValueError(f"{'img2img' if job.mode == 'img2img' else 'inpaint'} needs --init IMAGE")
    if job.mode == "inpaint" and job.mask is None:
        raise ValueError("inpaint needs --mask MASK (white = repaint, black = keep)")
    init = open_image(job.init, "init image").convert("RGB")
    mask = None if job.mask is None else open_image(job.mask, "mask").convert("L")
    if mask is not None and mask.size != init.size:
        raise ValueError(f"the mask {job.mask} is {mask.width}x{mask.height} but the init image {job.init} is "
                         f"{init.width}x{init.height} (width x height); give a mask of the image's size")
    return init, mask




def _load_refiner(base: StableDiffusion, path: Path, load: dict) -> StableDiffusion:
    """The SDXL refiner at ``path``, checked to fit ``base``."""
    if base.family != "sdxl":
        raise ValueError(f"--refiner needs an SDXL base model, but --model is {base.family}")
    refiner = StableDiffusion.load(path, **load)
    if refiner.family != "sdxl_refiner":
        raise ValueError(f"--refiner {path} is {refiner.family}, not an SDXL refiner")
    if refiner.vae.config.latent_channels != base.vae.config.latent_channels:
        raise ValueError(f"--refiner {path} works on {refiner.vae.config.latent_channels}-channel latents, the base on "
                         f"{base.vae.config.latent_channels}")
    return refiner


def _compare_models(job: Job, model: ModelId, refiner: ModelId | None, warn: Callable[[str], None],
                    vae: ModelId | None = None) -> None:
    """With ``--from``: warn where the image was made with other models than these."""
    if job.source is None:
        return
    made_vae = job.source.get("VAE hash")
    if made_vae and (vae is None or made_vae.lower() != vae.hash):
        given = "not given (the model's own is used)" if vae is None else f"{job.vae.name} [{vae.hash}]"
        warn(f"the image was made with the VAE {job.source.get('VAE', '?')} [{made_vae}]; --vae is {given}")
    made = job.source.get("Model hash", "")
    if len(made) == len(model.hash or "") and made.lower() != model.hash:  # A1111's old 8-digit hashes differ
        warn(f"the image was made with model {job.source.get('Model', '?')} [{made}]; --model is {model}, "
             "so the result will differ")
    if job.source.get("Refiner") and refiner is None:
        warn(f"the image was made with the refiner {job.source['Refiner']}; pass --refiner to use it too")
    elif refiner is not None and job.source.get("Refiner") and str(refiner) != job.source["Refiner"]:
        warn(f"the image was made with the refiner {job.source['Refiner']}; --refiner is {refiner}")
