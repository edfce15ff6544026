"""Aspect-ratio buckets (NovelAI's and kohya's scheme) for training on images of many shapes.

Instead of cropping every image to one square, each image goes to the bucket, a (height, width)
with both sides multiples of ``step`` and an area of at most ``max_area``, whose aspect ratio is
closest to its own; it is then resized to cover the bucket and cropped (``folder.py``), so it
loses at most a thin strip instead of the sides of a square. A batch holds images of one bucket
(``training.data.BucketBatches``).

The buckets (``make_buckets``): for every width w = step, 2 step, ..., the tallest multiple of
``step`` that fits the area, h = floor(max_area / w / step) * step, and the same with the sides
swapped, keeping those with aspect ratios up to ``MAX_ASPECT``. For max_area = 512^2, step 64:
(512, 512), (448, 576), (384, 640), (320, 704), (320, 768), (256, 832), ..., (256, 1024) and their
transposes.

Sizes are (height, width) throughout, as SDXL's size conditioning and ``torch`` shapes are.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Size = tuple[int, int]  # (height, width)

MAX_ASPECT = 4.0  # the longest bucket side is at most 4 times the shortest


def make_buckets(max_area: int, step: int, max_aspect: float = MAX_ASPECT) -> tuple[Size, ...]:
    """Every bucket (height, width) for ``max_area`` and ``step``, sorted by aspect ratio h / w,
    tallest first."""
    if step < 1 or max_area < step * step:
        raise ValueError(f"need step >= 1 and max_area >= step^2, got step={step}, max_area={max_area}")
    found: set[Size] = set()
    w = step
    while w * step <= max_area:
        h = max_area // w // step * step
        if max(h, w) <= max_aspect * min(h, w):
            found |= {(h, w), (w, h)}
        w += step
    return tuple(sorted(found, key=lambda hw: (-hw[0] / hw[1], hw[0])))


def log_aspect(size: Size) -> float:
    """log(height / width): 0 for squares; aspect ratios compare by their difference."""
    return math.log(size[0] / size[1])


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """The index of the bucket whose aspect ratio is closest to that of ``size`` (height, width),
    ties going to the larger bucket, then the taller one."""
    target = log_aspect(size)
    return min(range(len(buckets)),
               key=lambda k: (abs(log_aspect(buckets[k]) - target), -buckets[k][0] * buckets[k][1], -buckets[k][0]))


def assign_buckets(sizes: Sequence[Size], buckets: Sequence[Size], min_count: int = 1) -> list[int]:
    """The bucket (index into ``buckets``) of each image of size (height, width).

    A bucket that holds fewer than ``min_count`` images (the batch size: it could never fill a
    batch, and its images would never be seen) gives them all to the used bucket of the nearest
    aspect ratio; the smallest such bucket goes first and the rule repeats until every used bucket
    holds ``min_count`` images or only one bucket is left."""
    assignment = [nearest_bucket(s, buckets) for s in sizes]
    while True:
        counts = Counter(assignment)
        small = [k for k, n in counts.items() if n < min_count]
        if not small or len(counts) == 1:
            return assignment
        k = min(small, key=lambda j: (counts[j], j))
        into = min((j for j in counts if j != k),
                   key=lambda j: (abs(log_aspect(buckets[j]) - log_aspect(buckets[k])), j))
        assignment = [into if a == k else a for a in assignment]
