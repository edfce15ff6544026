"""An evaluation run: resolve the settings, load every network first (a missing weights file fails
before anything is drawn), draw the missing images of each cell, measure each cell, and write
``report.json``, ``report.md`` and the plots (``report.py``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics.adherence import judge_prompts, make_scorer, summarize
from ..metrics.fid import feature_statistics, frechet_distance
from ..metrics.images import RESIZE_NOTES
from ..metrics.kid import kernel_inception_distance
from .features import Extractor, Reference, load_reference, make_extractor
from .generation import Cell, generate_cell, load_model, model_kind
from .image_sets import ImageSet, cell_set, folder_sets
from .report import write_report
from .settings import DEFAULT_DOMAIN, DEFAULT_FEATURES, EvalSettings

DEFAULT_MODEL = "digits.safetensors"  # shipped in unfog/weights/, as `unfog sample`'s default
Warn = Callable[[str], None]


def default_model_path() -> Path:
    return Path(str(resources.files("unfog") / "weights" / DEFAULT_MODEL))


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resolve(settings: EvalSettings) -> tuple[EvalSettings, str]:
    """The model's path and kind (read from its header), and the features and adherence domain
    that fit it where the settings leave them open."""
    path = settings.model or default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    kind = model_kind(path)
    return replace(settings, model=path, features=settings.features or DEFAULT_FEATURES[kind],
                   domain=settings.domain or DEFAULT_DOMAIN[kind]), kind


def with_model_defaults(s: EvalSettings, model) -> EvalSettings:
    """Prompts, samplers, steps and guidance scales the settings leave open, from the model."""
    prompts = s.prompts or model.default_prompts()
    model.check_prompts(prompts)
    d = model.defaults
    return replace(s, prompts=prompts, prompts_source=s.prompts_source or ("given" if s.prompts else "the model's"),
                   samplers=s.samplers or (d["sampler"],), steps=s.steps or (d["steps"],),
                   cfg_scales=s.cfg_scales or (d["cfg_scale"],))


class Tools:
    """The networks a run's metrics need. Those that need no model load first, so that a missing
    weights file fails before the model is loaded, let alone anything drawn."""

    def __init__(self, s: EvalSettings):
        wants = set(s.metrics)
        self.features = s.features if wants & {"fid", "kid"} else None
        self.extractor: Extractor | None = None
        if self.features not in (None, "shapes-vae"):
            self.extractor = make_extractor(s.features, s.resize, inception_weights=s.inception_weights,
                                            device=s.device)
        self.clip = None
        if "clip" in wants:
            from ..metrics.clip_model import load_clip_model, weights_help

            if s.clip_model is None:
                raise FileNotFoundError(f"the clip metric needs --clip-model PATH. {weights_help()}")
            self.clip = load_clip_model(s.clip_model, device=s.device)
        self.scorer = None
        if "adherence" in wants:
            self.scorer = make_scorer(s.domain, **({"resize": s.resize} if s.domain == "digits" else {}))

    @property
    def needs_model(self) -> bool:
        return self.features == "shapes-vae"

    def add_model(self, s: EvalSettings, model) -> None:
        if self.needs_model:
            self.extractor = make_extractor(s.features, s.resize, model=model, device=s.device)


def measure(image_set: ImageSet, tools: Tools, reference: Reference | None, s: EvalSettings) -> dict[str, Any]:
    """The figures of one cell, from its image files, in one pass of 64 images at a time."""
    from ..metrics.clip_score import clip_scores

    feats, resized, sizes, clip, verdicts = [], {}, {}, [], []
    for images, prompts in image_set.chunks():
        for image in images:
            key = f"{image.width}x{image.height}"
            sizes[key] = sizes.get(key, 0) + 1
        if tools.extractor is not None:
            f, r = tools.extractor(images)
            feats.append(f)
            for k, v in r.items():
                resized[k] = resized.get(k, 0) + v
        if tools.clip is not None:
            keep = [i for i, p in enumerate(prompts) if p is not None]
            if keep:
                clip.extend(clip_scores(tools.clip, [images[i] for i in keep], [prompts[i] for i in keep]).tolist())
        if tools.scorer is not None:
            verdicts.extend(judge_prompts(tools.scorer, images, prompts))
    c = image_set.cell
    row: dict[str, Any] = {"cell": c.name, "sampler": c.sampler, "steps": c.steps, "cfg_scale": c.cfg_scale,
                           "folder": str(c.folder), "images": len(image_set), "sizes": sizes, "resized": resized,
                           "metrics": {}}
    m = row["metrics"]
    if feats:
        gen = torch.cat(feats)
        if gen.shape[0] < 2:
            raise ValueError(f"cell {c.name} has {gen.shape[0]} image; FID and KID need at least 2")
        if "fid" in s.metrics:
            m["fid"] = frechet_distance(*feature_statistics(gen), reference.mu, reference.sigma)
        if "kid" in s.metrics:
            kid = kernel_inception_distance(gen, reference.features, s.kid_subsets, s.kid_subset_size, s.seed)
            m["kid"] = kid._asdict()
    if tools.clip is not None:
        m["clip"] = {"mean": float(np.mean(clip)) if clip else None, "scored": len(clip),
                     "skipped": len(image_set) - len(clip)}
    if tools.scorer is not None:
        m["adherence"] = summarize(tools.scorer, image_set.prompts, verdicts).as_dict()
    return row


def _cells(s: EvalSettings) -> list[Cell]:
    root = s.out / "images"
    return [Cell.of(root, sampler, steps, cfg) for sampler in s.samplers for steps in s.steps for cfg in s.cfg_scales]


def _check_inputs(s: EvalSettings, reference: Reference | None) -> None:
    if "kid" in s.metrics and reference is not None and reference.features is None:
        raise ValueError(f"KID needs the reference images' features, and {reference.source} holds only statistics: "
                         "give --reference as a folder of images, or leave kid out of --metrics")


KID_MIN_IMAGES = 100  # below this a cell's KID gets a warning (its subsets are that small)


def _findings(s: EvalSettings, tools: Tools, reference: Reference | None, rows: list[dict]) -> tuple[list, list]:
    """(warnings, notes) about the figures: too few images for FID, resized images, skipped prompts."""
    warnings, notes = [], []
    ex = tools.extractor
    if ex is not None and "fid" in s.metrics:
        few = [f"{r['cell']}: {r['images']}" for r in rows if r["images"] < ex.dim]
        if reference is not None and 0 < reference.count < ex.dim:
            few.append(f"reference: {reference.count}")
        if few:
            warnings.append(f"FID is unreliable: fewer images than the {ex.dim} dimensions of the {ex.name} features "
                            f"({'; '.join(few)}), so the covariance is singular and the figure is biased by sample "
                            f"size; use well over {ex.dim} images per cell (FID papers use 10,000 to 50,000)")
    if "kid" in s.metrics:
        few = [f"{r['cell']}: {r['images']}" for r in rows if r["images"] < KID_MIN_IMAGES]
        if few:
            warnings.append(f"KID is unreliable: fewer than {KID_MIN_IMAGES} images ({'; '.join(few)}), so the "
                            "subsets it averages are tiny and its spread can exceed the figure itself (even "
                            f"negative); use well over {KID_MIN_IMAGES} images per cell (KID papers use 1,000+)")
    method = f"'{s.resize}': {RESIZE_NOTES[s.resize]}"
    if ex is not None and ex.size is not None:
        side = f"{ex.size}x{ex.size}"
        given = [(r["cell"], r["resized"]) for r in rows] + [("reference", reference.resized if reference else {})]
        for who, resized in given:
            if resized:
                counts = ", ".join(f"{n} of {k}" for k, n in resized.items())
                notes.append(f"{who}: images of another size than the {ex.name} network's {side} were resized to "
                             f"{side} by {method} ({counts})")
    elif ex is not None and reference is not None and reference.sizes:
        for r in rows:
            if set(r["sizes"]) != set(reference.sizes):
                notes.append(f"{r['cell']}: image sizes {', '.join(r['sizes'])} differ from the reference's "
                             f"({', '.join(reference.sizes)}); Inception resizes both to 299x299 by {method}")
    for r in rows:
        adherence = r["metrics"].get("adherence")
        if adherence and adherence["skipped"]:
            shown = adherence["skipped_prompts"][:5]
            notes.append(f"{r['cell']}: adherence skipped {adherence['skipped']} image(s) whose prompt is outside the "
                         f"{s.domain} domain or missing ({', '.join(map(repr, shown))}"
                         f"{' ...' if len(adherence['skipped_prompts']) > 5 else ''})")
    if reference is not None:
        notes.extend(reference.notes)
    return warnings, notes


def run_evaluation(settings: EvalSettings, *, progress: bool = True, warn: Warn = _stderr) -> dict[str, Any]:
    """Run the evaluation; returns the report (also written to ``settings.out``)."""
    s, kind = resolve(settings)
    tools = Tools(s)
    model = load_model(s.model, s.device) if s.images is None or tools.needs_model else None
    tools.add_model(s, model)
    if s.images is None:
        s = with_model_defaults(s, model)
    sets_given = folder_sets(s.images) if s.images is not None else None
    cells = None if sets_given is not None else _cells(s)
    per_cell = max(map(len, sets_given)) if sets_given else len(s.prompts) * s.images_per_prompt
    reference = load_reference(s.reference, tools.extractor, per_cell) if tools.extractor is not None else None
    _check_inputs(s, reference)

    start = time.perf_counter()
    drawn = {}
    if cells is not None:
        for cell in cells:
            drawn[cell.name] = generate_cell(model, cell, s.prompts, s.images_per_prompt, s.seed, progress)
    sets = sets_given or [cell_set(c, s.prompts, s.images_per_prompt) for c in cells]
    generated = time.perf_counter() - start
    rows = []
    for image_set in sets:
        row = measure(image_set, tools, reference, s)
        if image_set.cell.name in drawn:
            row["drawn"], row["found"] = drawn[image_set.cell.name]
        rows.append(row)
    warnings, notes = _findings(s, tools, reference, rows)
    for message in warnings:
        warn(message)
    report = _report(s, model, kind, tools, reference, rows, warnings, notes,
                     {"generate": generated, "measure": time.perf_counter() - start - generated})
    write_report(s.out, report, warn)
    return report


def _report(s, model, kind, tools, reference, rows, warnings, notes, seconds) -> dict[str, Any]:
    from .. import __version__
    from ..pipelines.outputs import ModelId

    model_id = model.id if model is not None else ModelId.of(s.model)
    ex = tools.extractor
    return {
        "unfog_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": s.as_dict(),
        "model": {"path": str(s.model), "kind": kind, "name": model_id.name, "hash": model_id.hash},
        "features": None if ex is None else {"name": ex.name, "dim": ex.dim, "input_size": ex.size or 299,
                                             "resize": ex.resize, "resize_method": RESIZE_NOTES[ex.resize]},
        "reference": None if reference is None else {"source": reference.source, "count": reference.count,
                                                     "sizes": reference.sizes, "resized": reference.resized,
                                                     "features_kept": reference.features is not None},
        "kid": None if "kid" not in s.metrics else {"num_subsets": s.kid_subsets, "subset_size": s.kid_subset_size,
                                                   "seed": s.seed, "order": "generated, reference"},
        "adherence_domain": s.domain if "adherence" in s.metrics else None,
        "cells": rows,
        "warnings": warnings,
        "notes": notes,
        "seconds": seconds,
    }
