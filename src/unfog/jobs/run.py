"""Running a job: ``generate`` draws its images and their parameters texts from cached models (the
server sends them); ``run`` also writes them as PNG files (the CLI's image commands)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from ..pipelines.draw import Progress, check_size, draw, parameters
from ..pipelines.inputs import to_pil
from ..pipelines.masking import blur_mask, crop_region, overlay, paste_back
from ..pipelines.outputs import ModelId, OutputTarget, StepProgress, draw_seed
from ..pipelines.precision import slow_dtype_warning
from .adapters import applied
from .cache import ModelCache
from .spec import Job, check, input_images


@dataclass(frozen=True)
class Drawn:
    """One image of a job, its seed and the parameters text its PNG carries."""

    image: Image.Image
    seed: int
    parameters: str


class Skipped(Exception):
    """Raised by a progress callback: abandon the image being drawn and go on with the next."""


class Interrupted(Exception):
    """Raised by a progress callback: stop the job. ``latents``, the sampler's latest ``denoised``
    (or None), become the last image, as far as it got (as A1111 returns an interrupted image)."""

    def __init__(self, latents=None):
        super().__init__("interrupted")
        self.latents = latents


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def generate(job: Job, models: ModelCache | None = None, warn: Callable[[str], None] = _stderr,
             progress: Progress = StepProgress) -> Iterator[Drawn]:
    """Draw the job's images one by one (image i with seed ``seed + i``) with the models of
    ``models`` (a fresh cache: loaded for this job only). The adapters the job asks for are on the
    models while the images are drawn and off again when the iterator ends or is closed. A
    ``progress`` callback may raise ``Skipped`` (that image is left out) or ``Interrupted`` (the
    job ends; the image being drawn is decoded from the latents it carries, if any)."""
    check(job)
    init, mask = input_images(job)
    if mask is not None and job.settings.masked_content is None:  # an inpainting run says so in its PNG
        job = replace(job, settings=replace(job.settings, masked_content="original"))
    if job.settings.hires and job.settings.strength is None:  # hires fix records its denoising strength
        job = replace(job, settings=replace(job.settings, strength=job.settings.hires_pass().strength))
    if mask is not None and job.settings.mask_blur > 0:
        mask = blur_mask(mask, job.settings.mask_blur)
    models = models or ModelCache()
    pipe, refiner = models.pipelines(job)
    for p in (pipe, refiner):
        if p is not None and p.compile_mode != job.compile:
            p.compile(job.compile, warn)
    load = models.load_options(job)
    if (slow := slow_dtype_warning(load["dtype"], load["device"])) is not None:
        warn(slow)
    model_id = models.model_id(job.model)
    refiner_id = job.refiner and models.model_id(job.refiner)
    vae_id = job.vae and models.model_id(job.vae)
    _compare_models(job, model_id, refiner_id, warn, vae_id)
    s = job.settings
    with applied(pipe, refiner, job, load, warn) as adapters:
        seed = draw_seed(s.seed)
        width = s.width or (init.width if init else pipe.default_size)
        height = s.height or (init.height if init else pipe.default_size)
        check_size(pipe, width, height, warn)
        region = None if mask is None or not s.only_masked else crop_region(mask, s.mask_padding, width, height)
        if region is not None:  # "only masked": draw the masked area's surroundings at width x height
            full_init, full_mask = init, mask
            init, mask = init.crop(region), mask.crop(region)
        if init is not None and init.size != (width, height):
            init = init.resize((width, height), Image.LANCZOS)
            mask = None if mask is None else mask.resize((width, height), Image.LANCZOS)
        if region is None:
            full_init, full_mask = init, mask
        for i in range(job.batch_size):
            one = replace(s, seed=seed + i, width=width, height=height)
            drawn = replace(adapters.settings, seed=one.seed, width=width, height=height)
            text = parameters(pipe, one, model_id, refiner_id, adapters.unit_texts, vae_id)
            try:
                image = draw(pipe, refiner, drawn, init, mask, f"image {i + 1}/{job.batch_size}", adapters.controls,
                             warn if i == 0 else None, progress)  # a resized hint is said once
            except Skipped:
                continue
            except Interrupted as stop:
                if stop.latents is not None:
                    image = to_pil(pipe.decode(stop.latents))[0]
                    yield Drawn(_inpainted(image, full_init, full_mask, region), one.seed, text)
                return
            yield Drawn(_inpainted(image, full_init, full_mask, region), one.seed, text)


def _inpainted(image: Image.Image, init: Image.Image | None, mask: Image.Image | None, region) -> Image.Image:
    """An inpainted drawing pasted back into its region (only masked) and the init image laid over
    what was not to be repainted, as A1111 does; any other drawing as it is."""
    if mask is None:
        return image
    if region is not None:
        image = paste_back(image, init, region)
    return overlay(image, init, mask)


def run(job: Job, warn: Callable[[str], None] = _stderr, models: ModelCache | None = None) -> Iterator[Path]:
    """Draw and save the job's images (``job.output``); yields each file as it is written."""
    check(job)
    target = OutputTarget.parse(job.output, job.batch_size, job.overwrite)  # a bad --output fails before loading
    for d in generate(job, models, warn):
        yield target.save(d.image, d.seed, d.parameters)


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
