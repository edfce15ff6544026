"""Prompt adherence of our own models: does each image show what its prompt asked for?

One interface over two domains, each judged by a deterministic scorer of our own:

- ``"shapes"``: the prompt is read by ``datasets.shapes_text.parse_prompt`` into a ``PromptSpec``
  and judged by the shapes analyzer (``shapes_analyzer.score``), GenEval-style. Categories are
  the six of the data set (single_object, two_objects, counting, colors, position, color_attr);
  a parsed prompt's category is inferred, so "colors" never appears (its prompts read as
  single_object ones).
- ``"digits"``: the prompt names a digit ("3", "digit 3", "the digit three", "a 3"; or an int
  class id) and the shipped digit classifier must call the image that digit. Categories are the
  classes "0".."9" (class accuracy).

A prompt outside the domain ("a photo of a cat" for shapes, "12" for digits) is not an error: its
images are skipped and counted (``skipped``, ``skipped_prompts``).

Reported: accuracy per category, ``overall`` = the mean over the categories present (GenEval's
"overall"), and ``accuracy`` = the fraction of all scored images (the two agree when every
category has as many images). Images are PIL images or tensors (C, H, W) in [-1, 1].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..datasets.shapes_text import CATEGORIES, PromptSpec, parse_prompt
from .inception import Resize
from .images import stack_at_size

Domain = Literal["shapes", "digits"]
DOMAINS: tuple[str, ...] = get_args(Domain)
ImageLike = Image.Image | Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT = re.compile(r"^(?:(?:a|an|the)\s+)?(?:(?:digit|number|class)\s+)?(\w+)$")


def parse_digit(prompt: str | int) -> int | None:
    """The digit a prompt asks for ("3", "digit 3", "the digit three", "a 3", or the int 3), or
    None when it names none (a prompt outside the digits domain)."""
    if isinstance(prompt, (int, np.integer)) and not isinstance(prompt, bool):
        return int(prompt) if 0 <= prompt <= 9 else None
    if not isinstance(prompt, str):
        return None
    m = _DIGIT.match(" ".join(prompt.lower().split()).rstrip("."))
    if m is None:
        return None
    word = m.group(1)
    if word.isdigit() and len(word) == 1:
        return int(word)
    return DIGIT_WORDS.index(word) if word in DIGIT_WORDS else None


class Scorer(Protocol):
    """What a domain needs: read a prompt's target (None: outside the domain), name its category,
    and judge images against targets."""

    domain: str

    def target(self, prompt: str | int) -> Any | None: ...

    def category(self, target: Any) -> str: ...

    def judge(self, images: Sequence[ImageLike], targets: Sequence[Any]) -> list[bool]: ...


class ShapesScorer:
    """GenEval-style adherence on the ``shapes`` domain, by the deterministic analyzer."""

    domain = "shapes"

    def __init__(self, config=None):
        from .shapes_analyzer import AnalyzerConfig

        self.config = config or AnalyzerConfig()

    def target(self, prompt: str | int) -> PromptSpec | None:
        return parse_prompt(prompt) if isinstance(prompt, str) else None

    def category(self, target: PromptSpec) -> str:
        return target.category

    def judge(self, images: Sequence[ImageLike], targets: Sequence[PromptSpec]) -> list[bool]:
        from .shapes_analyzer import score

        return [bool(score(image, spec, self.config)) for image, spec in zip(images, targets)]


class DigitsScorer:
    """Class accuracy on the digits domain, by the shipped digit classifier (or ``classifier``).
    Images of another size than the classifier's are resized by the ``resize`` convention."""

    domain = "digits"

    def __init__(self, classifier=None, resize: Resize = "clean"):
        from .digits_classifier import load_digit_classifier

        self.classifier = classifier if classifier is not None else load_digit_classifier()
        self.resize = resize

    def target(self, prompt: str | int) -> int | None:
        return parse_digit(prompt)

    def category(self, target: int) -> str:
        return str(target)

    @torch.no_grad()
    def judge(self, images: Sequence[ImageLike], targets: Sequence[int]) -> list[bool]:
        if not len(images):
            return []
        size = self.classifier.config.image_size
        x, _ = stack_at_size(images, size, self.resize, channels=1)  # (N, 1, S, S) in [0, 1]
        device = next(self.classifier.parameters()).device
        predicted = self.classifier(x.to(device) * 2 - 1).argmax(1).cpu()
        return (predicted == torch.as_tensor(list(targets))).tolist()


def make_scorer(domain: str, **options) -> Scorer:
    """The scorer of a domain ("shapes" or "digits"); ``options`` go to its constructor."""
    if domain == "shapes":
        return ShapesScorer(**options)
    if domain == "digits":
        return DigitsScorer(**options)
    raise ValueError(f"unknown adherence domain {domain!r}; valid: {', '.join(DOMAINS)}")


@dataclass(frozen=True)
class AdherenceResult:
    domain: str
    per_category: dict[str, float]  # accuracy of the images of each category present
    counts: dict[str, int]  # images scored per category
    overall: float | None  # mean over the categories present (GenEval's); None if nothing was scored
    accuracy: float | None  # fraction of all scored images
    scored: int
    skipped: int  # images whose prompt is outside the domain
    skipped_prompts: tuple[str, ...] = ()  # those prompts, each once
    per_prompt: dict[str, float] = field(default_factory=dict)  # accuracy of each scored prompt

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped_prompts": list(self.skipped_prompts)}


def judge_prompts(scorer: Scorer, images: Sequence[ImageLike], prompts: Sequence[str | int | None]
                  ) -> list[bool | None]:
    """One verdict per image: True / False, or None where the prompt is outside the domain (or
    missing). Feed ``summarize`` with these, gathered over as many calls as you like."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; they are scored in pairs")
    targets = [None if p is None else scorer.target(p) for p in prompts]
    keep = [i for i, t in enumerate(targets) if t is not None]
    hits = scorer.judge([images[i] for i in keep], [targets[i] for i in keep]) if keep else []
    out: list[bool | None] = [None] * len(prompts)
    for i, hit in zip(keep, hits):
        out[i] = bool(hit)
    return out


def summarize(scorer: Scorer, prompts: Sequence[str | int | None], verdicts: Sequence[bool | None]
              ) -> AdherenceResult:
    """Per-category accuracy, overall and counts from the verdicts of ``judge_prompts``."""
    by_category: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    skipped: list[str] = []
    for prompt, verdict in zip(prompts, verdicts):
        if verdict is None:
            if prompt is not None and str(prompt) not in skipped:
                skipped.append(str(prompt))
            continue
        by_category.setdefault(scorer.category(scorer.target(prompt)), []).append(verdict)
        by_prompt.setdefault(str(prompt), []).append(verdict)
    order = list(CATEGORIES) if scorer.domain == "shapes" else [str(k) for k in range(10)]
    names = [c for c in order if c in by_category] + sorted(set(by_category) - set(order))
    per_category = {c: float(np.mean(by_category[c])) for c in names}
    scored = sum(len(v) for v in by_category.values())
    return AdherenceResult(
        domain=scorer.domain,
        per_category=per_category,
        counts={c: len(by_category[c]) for c in names},
        overall=float(np.mean(list(per_category.values()))) if per_category else None,
        accuracy=float(sum(sum(v) for v in by_category.values()) / scored) if scored else None,
        scored=scored,
        skipped=sum(v is None for v in verdicts),
        skipped_prompts=tuple(skipped),
        per_prompt={p: float(np.mean(v)) for p, v in by_prompt.items()},
    )


def measure_adherence(scorer: Scorer, images: Sequence[ImageLike], prompts: Sequence[str | int | None]
                      ) -> AdherenceResult:
    """Adherence of ``images`` to the ``prompts`` they were drawn for, by ``scorer``."""
    return summarize(scorer, prompts, judge_prompts(scorer, images, prompts))
