"""How good is a class-conditional digits model? Scored with our own digit classifier:

- class accuracy: the fraction of images drawn for class k that the classifier calls k;
- FID in the classifier's 128-d feature space against the held-out digits (the split the
  diffusion model never saw), next to the same FID for the real training digits as a floor;
- outright failures, which the classifier cannot see (it names a digit in most of them with high
  confidence): blank cells, and speckled "noise" cells rougher than every real training digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..datasets.digits import NUM_CLASSES, digits_tensors
from .digits_classifier import DigitClassifier, extract_features, load_digit_classifier
from .fid import fid_from_features


# The failure rule's thresholds, set just above the real training digits' extremes; the held-out
# digits, never used to set them, give its false-alarm rate (0 of 359, docs/benchmarks.md).
BLANK_INK = 0.03  # blank: under 3% of the pixels brighter than mid-grey (real digits: 20-40%)
NOISE_HF = 0.25  # noise: relative high-frequency energy above this (real training digits: at most 0.205)
NOISE_TV = 0.125  # ... or total variation above this (real training digits: at most 0.118)


@dataclass(frozen=True)
class DigitScores:
    accuracy: float  # over all samples
    per_class: tuple[float, ...]  # accuracy of the samples drawn for each class
    fid: float  # classifier-feature FID of the samples against the held-out digits
    n: int

    @property
    def worst_class(self) -> tuple[int, float]:
        k = min(range(len(self.per_class)), key=self.per_class.__getitem__)
        return k, self.per_class[k]


def score_digits(images: Tensor, labels: Tensor, classifier: DigitClassifier | None = None,
                 image_size: int = 16) -> DigitScores:
    """Scores of images (N, 1, S, S) in [-1, 1] drawn for ``labels`` (N,)."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    classifier = classifier or load_digit_classifier()
    with torch.no_grad():
        predicted = classifier(images.float()).argmax(1)
    hits = predicted == labels
    per_class = tuple(float(hits[labels == k].float().mean()) if (labels == k).any() else float("nan")
                      for k in range(NUM_CLASSES))
    reference, _ = digits_tensors("test", size=image_size)
    fid = fid_from_features(extract_features(classifier, images.float()), extract_features(classifier, reference))
    return DigitScores(float(hits.float().mean()), per_class, fid, images.shape[0])


def real_digits_floor(classifier: DigitClassifier | None = None, image_size: int = 16) -> DigitScores:
    """The same scores for the real training digits: what a perfect model would get."""
    images, labels = digits_tensors("train", size=image_size)
    return score_digits(images, labels, classifier, image_size)


def draw_per_class(generate: Callable[[Tensor], Tensor], per_class: int, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Call ``generate(labels) -> images`` in batches for ``per_class`` images of every class."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    chunks = [generate(labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]
    return torch.cat(chunks), labels


def roughness(images: Tensor) -> tuple[Tensor, Tensor]:
    """(relative high-frequency energy, total variation), each (N,), of images (N, 1, S, S) in [-1, 1]:
    mean |x - its 3x3 box blur| / mean x, and the mean |difference| of neighbouring pixels, x in [0, 1]."""
    x = (images.float() + 1) / 2
    blur = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    hf = (x - blur).abs().mean((1, 2, 3)) / x.mean((1, 2, 3)).clamp_min(1e-3)
    tv = ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))) / 2
    return hf, tv


def count_failures(images: Tensor, labels: Tensor, ink: float = BLANK_INK, hf_max: float = NOISE_HF,
                   tv_max: float = NOISE_TV, classifier: DigitClassifier | None = None) -> dict[str, int]:
    """Counts among images (N, 1, S, S) in [-1, 1] drawn for ``labels`` (N,): "blank" cells; "noise"
    (not blank, rougher than ``hf_max`` or ``tv_max``); "wrong" (neither, but classified as another
    digit); "right" (every cell the classifier reads as the digit asked for, failures included)."""
    classifier = classifier or load_digit_classifier()
    with torch.no_grad():
        predicted = classifier(images.float()).argmax(1)
    blank = (images > 0).float().mean((1, 2, 3)) < ink
    hf, tv = roughness(images)
    noise = ~blank & ((hf > hf_max) | (tv > tv_max))
    wrong = ~blank & ~noise & (predicted != labels)
    return {"n": len(labels), "blank": int(blank.sum()), "noise": int(noise.sum()), "wrong": int(wrong.sum()),
            "right": int((predicted == labels).sum())}
