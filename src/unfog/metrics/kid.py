"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", section 4).

KID is the squared maximum mean discrepancy between the feature distributions P (e.g. real
images) and Q (generated), with the cubic polynomial kernel on d-dimensional features:

    k(x, y) = (x . y / d + 1)^3

estimated without bias (eq. 2 of the paper; Gretton et al. 2012, lemma 6) from samples
x_1..x_m ~ P and y_1..y_m ~ Q:

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
              - 2/m^2 sum_{i, j} k(x_i, y_j)

Being unbiased, it can be negative when P = Q. Like clean-fid, torch-fidelity and torchmetrics,
we average it over ``num_subsets`` random subsets of ``subset_size`` features from each set
(drawn without replacement; the size is capped at the smaller set) and report the mean and the
standard deviation over subsets (population std, ``ddof=0``, as torch-fidelity and torchmetrics
do). Defaults are theirs: 100 subsets of 1000. Papers often print KID x 1000.

Randomness is explicit: ``generator`` is a numpy ``Generator`` or an int seed. Subset s draws
``generator.choice(N1, m, replace=False)`` from ``features1``, then the same from ``features2``.
Everything is float64 numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from unfog.metrics.fid import _as_float64

Array = np.ndarray


class KIDResult(NamedTuple):
    """``mean`` and ``std`` of the unbiased MMD^2 over ``num_subsets`` subsets of ``subset_size``."""

    mean: float
    std: float
    num_subsets: int
    subset_size: int


def polynomial_kernel(x: Array, y: Array) -> Array:
    """(M, D), (N, D) -> (M, N): ``(x . y / D + 1)^3``, KID's kernel."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor | Array, y: torch.Tensor | Array) -> float:
    """Unbiased MMD^2 (see the module docstring) between samples (M, D) and (N, D), M, N >= 2.
    With M != N the cross term is divided by M N and each within-set term by its own M(M-1)."""
    x, y = _as_float64(x, "x"), _as_float64(y, "y")
    _check_pair(x, y, minimum=2)
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))  # mean over i != j
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: torch.Tensor | Array,
    features2: torch.Tensor | Array,
    num_subsets: int = 100,
    subset_size: int = 1000,
    generator: np.random.Generator | int = 0,
) -> KIDResult:
    """KID between feature sets (N1, D) and (N2, D): mean and std of the unbiased MMD^2 over
    ``num_subsets`` subsets of ``min(subset_size, N1, N2)`` features drawn from each set."""
    f1, f2 = _as_float64(features1, "features1"), _as_float64(features2, "features2")
    _check_pair(f1, f2, minimum=2)
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    m = min(subset_size, f1.shape[0], f2.shape[0])
    mmds = np.empty(num_subsets, dtype=np.float64)
    for s in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]  # (m, D)
        y = f2[rng.choice(f2.shape[0], m, replace=False)]  # (m, D)
        mmds[s] = mmd2_unbiased(x, y)
    return KIDResult(float(mmds.mean()), float(mmds.std()), num_subsets, m)


def _check_pair(x: Array, y: Array, minimum: int) -> None:
    for name, a in (("first", x), ("second", y)):
        if a.ndim != 2:
            raise ValueError(f"the {name} feature set must be 2-D (N, D), got shape {a.shape}")
        if a.shape[0] < minimum:
            raise ValueError(f"the {name} feature set needs at least {minimum} vectors, got {a.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
