"""The adapters a job's prompt and options ask for, found by name in their folders and applied to
loaded pipelines: LoRAs (``<lora:NAME:W>``), hypernetworks (``<hypernet:NAME:W>``), textual-inversion
embeddings (by name in the prompt) and ControlNet units; ``applied`` takes them all off again, so a
cached pipeline serves the next job as it was loaded."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from ..checkpoint.embeddings import EMBEDDING_SUFFIXES
from ..pipelines import hypernetwork
from ..pipelines.control_units import (ControlSpec, find_controlnet, model_title, preprocessor, recorded_hash,
                                       recorded_units, spec_from_unit, unit_text)
from ..pipelines.controlnet import Control
from ..pipelines.draw import check_vocabulary, prompt_words
from ..pipelines.images import open_image
from ..pipelines.lora import extract_lora_tags, find_lora, parse_hashes
from ..pipelines.outputs import Settings
from ..pipelines.stable_diffusion import StableDiffusion
from .spec import Job


def load_embeddings(pipe: StableDiffusion, refiner: StableDiffusion | None, s: Settings, folders: tuple[Path, ...],
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


def apply_loras(pipe: StableDiffusion, s: Settings, job: Job, warn: Callable[[str], None]) -> Settings:
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
    return replace(s, prompt=prompt, negative_prompt=negative, **_hires_prompts(s, extract_lora_tags))


def _hires_prompts(s: Settings, extract) -> dict[str, str]:
    """The hires prompts without their adapter tags (the first pass's adapters act on both passes)."""
    return {name: extract(getattr(s, name))[0] for name in ("hr_prompt", "hr_negative_prompt")
            if getattr(s, name) is not None}


def apply_hypernetworks(pipe: StableDiffusion, s: Settings, job: Job, warn: Callable[[str], None]) -> Settings:
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
    return replace(s, prompt=prompt, negative_prompt=negative, **_hires_prompts(s, hypernetwork.extract_hypernet_tags))


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


def load_controls(pipe: StableDiffusion, job: Job, load: dict, warn: Callable[[str], None]
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
        image = spec.image if isinstance(spec.image, Image.Image) else open_image(spec.image, "ControlNet hint")
        image = image.convert("RGB")
        fn = preprocessor(spec.module)
        if fn is not None:
            image = fn(image, **dict(spec.options))
        resize, mode = spec.resize_mode or job.control_resize, spec.control_mode or job.control_mode
        controls.append(Control(model, image, spec.weight, spec.start, spec.end, resize, mode))
        texts.append(unit_text(spec, title, resize, mode))
    return controls, texts


@dataclass(frozen=True)
class Applied:
    """What ``applied`` gives the drawing: the settings with the adapter tags taken out of both
    prompts (as the text encoder must see them), the loaded ControlNet units and their parameters
    texts (``ControlNet i``)."""

    settings: Settings
    controls: list[Control]
    unit_texts: list[str]


@contextmanager
def applied(pipe: StableDiffusion, refiner: StableDiffusion | None, job: Job, load: dict,
            warn: Callable[[str], None]) -> Iterator[Applied]:
    """Apply the job's LoRAs, hypernetworks, embeddings and ControlNets to ``pipe`` (and the
    embeddings to ``refiner``) for the ``with`` block; on leaving it, even by an error, every one
    is taken off (the LoRAs' merged weights restored exactly)."""
    try:
        s = apply_loras(pipe, job.settings, job, warn)  # the prompts without their <lora:…> tags
        s = apply_hypernetworks(pipe, s, job, warn)  # nor their <hypernet:…> tags
        load_embeddings(pipe, refiner, s, job.embedding_dirs, warn)
        check_vocabulary(pipe, s, warn)
        controls, texts = load_controls(pipe, job, load, warn)
        yield Applied(s, controls, texts)
    finally:
        for p in (pipe, refiner):
            if p is not None:
                p.unload_loras()
                p.unload_hypernetworks()
                p.unload_embeddings()
