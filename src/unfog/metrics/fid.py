"""Fréchet distance between Gaussians fitted to feature sets (FID, Heusel et al. 2017).

For features X1 ~ N(mu1, S1) and X2 ~ N(mu2, S2) the squared Fréchet (2-Wasserstein)
distance is

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

pytorch-fid takes ``scipy.linalg.sqrtm(S1 @ S2)``, a non-symmetric matrix whose square root
can come back complex or inaccurate when the covariances are near singular (always, when
there are fewer samples than feature dimensions). We use instead that S1 S2 is similar to
the symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2) (conjugate by S1^(1/2)), so

    tr((S1 S2)^(1/2)) = tr(M^(1/2)) = sum_i sqrt(lambda_i(M)),

with both square roots taken by symmetric eigendecomposition (``numpy.linalg.eigh``) and
rounding-level negative eigenvalues clipped to zero. Everything runs in float64 with numpy
only; no scipy at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

Array = np.ndarray


def _as_float64(x: torch.Tensor | Array, name: str) -> Array:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def feature_statistics(features: torch.Tensor | Array) -> tuple[Array, Array]:
    """Mean (D,) and covariance (D, D), unbiased (N - 1), float64, of features (N, D)."""
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(axis=0)  # (D,)
    centred = f - mu  # (N, D)
    sigma = centred.T @ centred / (f.shape[0] - 1)  # (D, D)
    return mu, sigma


def _check_statistics(mu: Array, sigma: Array, which: str) -> None:
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be 1-D (D,), got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{which} must be (D, D) = {(mu.shape[0],) * 2} to match mu{which}, got {sigma.shape}")


def _sqrt_psd(s: Array) -> Array:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    lam, v = np.linalg.eigh((s + s.T) / 2)  # (D,), (D, D)
    return (v * np.sqrt(np.clip(lam, 0.0, None))) @ v.T  # V diag(sqrt(lam)) V^T


def trace_sqrt_product(sigma1: Array, sigma2: Array) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    root1 = _sqrt_psd(sigma1)
    m = root1 @ sigma2 @ root1  # (D, D), symmetric PSD up to rounding
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(
    mu1: torch.Tensor | Array,
    sigma1: torch.Tensor | Array,
    mu2: torch.Tensor | Array,
    sigma2: torch.Tensor | Array,
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); this is the FID."""
    mu1, sigma1 = _as_float64(mu1, "mu1"), _as_float64(sigma1, "sigma1")
    mu2, sigma2 = _as_float64(mu2, "mu2"), _as_float64(sigma2, "sigma2")
    _check_statistics(mu1, sigma1, "1")
    _check_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two feature dimensions differ: mu1 {mu1.shape} vs mu2 {mu2.shape}")
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(d2), 0.0)  # a distance; only rounding can take it below zero


def fid_from_features(features1: torch.Tensor | Array, features2: torch.Tensor | Array) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def save_statistics(path: str | Path, mu: torch.Tensor | Array, sigma: torch.Tensor | Array) -> None:
    """Write reference statistics to an ``.npz`` with keys ``mu`` and ``sigma`` (float64)."""
    mu, sigma = _as_float64(mu, "mu"), _as_float64(sigma, "sigma")
    _check_statistics(mu, sigma, "")
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str | Path) -> tuple[Array, Array]:
    """Read ``(mu, sigma)`` written by ``save_statistics`` (or pytorch-fid's ``.npz``)."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks key(s) {sorted(missing)}; it has {sorted(data.files)}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    _check_statistics(mu, sigma, "")
    return mu, sigma
