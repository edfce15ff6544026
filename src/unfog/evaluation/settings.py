"""What an evaluation run is: its settings, checked on construction, and the prompts file.

Every field left None is filled from the model (``resolve`` in ``run.py``): the built-in digits
model when no model is named; its classes "0".."9" as prompts; the sampler, steps and guidance
scale the model recommends; features and adherence domain that fit it (``defaults_for``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..choices import check_choice
from ..diffusion.registry import resolve_sampler
from ..metrics.adherence import DOMAINS
from ..metrics.inception import Resize

Metric = Literal["fid", "kid", "clip", "adherence"]
METRICS: tuple[str, ...] = get_args(Metric)
Features = Literal["inception", "shapes-vae", "digits"]
FEATURES: tuple[str, ...] = get_args(Features)
RESIZES: tuple[str, ...] = get_args(Resize)
ModelKind = Literal["pixel", "text2image", "checkpoint"]

# What fits each kind of model when the settings leave it open.
DEFAULT_FEATURES = {"pixel": "digits", "text2image": "shapes-vae", "checkpoint": "inception"}
DEFAULT_DOMAIN = {"pixel": "digits", "text2image": "shapes", "checkpoint": "shapes"}


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation run. Cells are every (sampler, steps, cfg scale); each draws
    ``images_per_prompt`` images of every prompt (image k of a cell is draw k // P of prompt
    k % P, P prompts, with seed ``seed + k``).

    model: a model file (None: the built-in digits model). images: evaluate the images of this
        folder instead of generating (then samplers, steps and cfg scales are not used).
    metrics: any of "fid", "kid", "clip", "adherence". reference: the real images FID and KID
        compare with, a folder of images or a ``.npz`` of statistics (``unfog eval-stats``);
        None: a built-in held-out set for the "digits" and "shapes-vae" features.
    features: "inception" (needs ``inception_weights``), "shapes-vae" (the VAE of an unfog
        text-to-image model), "digits" (the shipped digit classifier).
    resize: how images of another size than the feature network's are resized, "legacy" or "clean".
    domain: of adherence, "shapes" or "digits". clip_model: a CLIP model folder, for "clip".
    """

    out: Path
    model: Path | None = None
    prompts: tuple[str, ...] | None = None
    prompts_source: str | None = None  # where the prompts came from, for the report
    images_per_prompt: int = 10
    samplers: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None
    cfg_scales: tuple[float, ...] | None = None
    seed: int = 0
    metrics: tuple[str, ...] = ("fid", "kid", "adherence")
    reference: Path | None = None
    features: str | None = None
    inception_weights: Path | None = None
    clip_model: Path | None = None
    images: Path | None = None
    resize: str = "legacy"
    domain: str | None = None
    device: str = "cpu"
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        for name in ("out", "model", "reference", "inception_weights", "clip_model", "images"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        kinds = {"prompts": str, "samplers": str, "steps": int, "cfg_scales": float, "metrics": str}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)):
                    raise ValueError(f"{name} must be a sequence, not the single string {value!r}")
                values = tuple(kind(v) for v in value)
                # a grid value given twice is one cell; prompts may repeat (weighting them)
                object.__setattr__(self, name, values if name == "prompts" else tuple(dict.fromkeys(values)))
        for metric in self.metrics:
            check_choice("metric", metric, METRICS)
        if not self.metrics:
            raise ValueError(f"give at least one metric; valid: {', '.join(METRICS)}")
        if self.features is not None:
            check_choice("feature extractor", self.features, FEATURES)
        if self.domain is not None:
            check_choice("adherence domain", self.domain, DOMAINS)
        check_choice("resize convention", self.resize, RESIZES)
        if self.images_per_prompt < 1:
            raise ValueError(f"images per prompt must be >= 1, got {self.images_per_prompt}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for sampler in self.samplers or ():
            resolve_sampler(sampler)  # a ValueError naming the valid samplers
        if any(s < 1 for s in self.steps or ()):
            raise ValueError(f"steps must all be >= 1, got {list(self.steps)}")
        if any(c < 0 for c in self.cfg_scales or ()):
            raise ValueError(f"guidance scales must all be >= 0, got {list(self.cfg_scales)}")
        for name in ("samplers", "steps", "cfg_scales", "prompts"):
            if getattr(self, name) == ():
                raise ValueError(f"{name} is empty; give at least one, or leave it out for the model's default")
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ValueError(f"KID needs kid_subsets >= 1 and kid_subset_size >= 2, got {self.kid_subsets} and "
                             f"{self.kid_subset_size}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON values (paths as strings, tuples as lists)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; lines starting with # are comments)")
    return prompts
