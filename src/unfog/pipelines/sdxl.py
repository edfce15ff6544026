"""SDXL's vector conditioning ``y`` for both halves of classifier-free guidance.

The base conditions on (original size, crop top-left, target size), the refiner on (original
size, crop top-left, aesthetic score), each after the pooled bigG text embedding
(``conditioning.sdxl_vector_cond`` / ``sdxl_refiner_vector_cond``). As diffusers does by
default, the negative half uses the same sizes and, for the refiner, its own aesthetic score
(A1111 and diffusers: 6.0 for the prompt, 2.5 for the negative prompt).
"""

from __future__ import annotations

from torch import Tensor

from ..conditioning import sdxl_refiner_vector_cond, sdxl_vector_cond


def vector_conditions(
    family: str,
    pooled: Tensor,
    negative_pooled: Tensor,
    *,
    original_size: tuple[int, int],
    crop: tuple[int, int],
    target_size: tuple[int, int],
    aesthetic_score: float,
    negative_aesthetic_score: float,
) -> tuple[Tensor, Tensor]:
    """(y, negative y), each (B, P + 6 * 256) for "sdxl" or (B, P + 5 * 256) for "sdxl_refiner"."""
    if family == "sdxl":
        return (sdxl_vector_cond(pooled, original_size, crop, target_size),
                sdxl_vector_cond(negative_pooled, original_size, crop, target_size))
    if family == "sdxl_refiner":
        return (sdxl_refiner_vector_cond(pooled, original_size, crop, aesthetic_score),
                sdxl_refiner_vector_cond(negative_pooled, original_size, crop, negative_aesthetic_score))
    raise ValueError(f"family {family!r} has no vector conditioning; valid: sdxl, sdxl_refiner")
