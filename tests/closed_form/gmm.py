"""Gaussian mixtures and their exact denoiser: the closed-form oracle for every sampler.

Data x_0 ~ sum_k w_k N(mu_k, Sigma_k) in d dimensions, noised in the VE variable of ``unfog``

    x = x_0 + sigma * eps,   eps ~ N(0, I),   so   p_sigma(x) = sum_k w_k N(x; mu_k, Sigma_k + sigma^2 I).

Everything about p_sigma is known in closed form. With Sigma_k = U_k diag(lambda_k) U_k^T (an
eigendecomposition made once) and y_k = U_k^T (x - mu_k), the component log-densities are

    log N(x; mu_k, Sigma_k + sigma^2 I) = -1/2 sum_j [log(2 pi (lambda_kj + sigma^2)) + y_kj^2 / (lambda_kj + sigma^2)]

the responsibilities are r_k(x) = softmax_k(log w_k + that), and the exact (MMSE) denoiser is

    D(x, sigma) = E[x_0 | x] = sum_k r_k(x) [ mu_k + U_k diag(lambda_k / (lambda_k + sigma^2)) y_k ].

A sampler driven by D must reproduce the mixture, up to its discretisation error and the Monte-Carlo
noise of a finite sample set; this module supplies D, a float64 reference ODE solver, the converters
that present D as a discrete-time eps / v / x0 network, and the error measures.

Shapes: B samples, d dimensions, K components. All maths is float64; the public denoiser returns
float32 like a network would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from unfog.diffusion import DiscreteSchedule

# D(x, sigma) in float64: x (B, d), sigma (B,) -> (B, d).
Denoiser64 = Callable[[Tensor, Tensor], Tensor]


def _sum_last(t: Tensor) -> Tensor:
    """t.sum(-1) as a matrix-vector product: several times faster for a short last axis (d = 2)."""
    return t @ t.new_ones(t.shape[-1])


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) with its exact sampler and exact denoiser.

    Args:
        weights: (K,) positive, normalised here.
        means: (K, d).
        covs: (K, d, d) symmetric positive definite.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        self.weights = (weights / weights.sum()).double()  # (K,)
        self.means = means.double()  # (K, d)
        self.covs = covs.double()  # (K, d, d)
        self.lam, self.U = torch.linalg.eigh(self.covs)  # (K, d), (K, d, d); Sigma_k = U diag(lam) U^T
        if (self.lam <= 0).any():
            raise ValueError("covariances must be positive definite")
        self.mean_U = torch.einsum("kd,kde->ke", self.means, self.U)  # (K, d): U_k^T mu_k
        self.sqrt_cov = self.U * self.lam.sqrt()[:, None, :]  # (K, d, d): U_k diag(sqrt(lam_k)), so A A^T = Sigma_k

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ----------------------------------------------------------------------------------------------
    # Exact sampling
    # ----------------------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n exact draws from the mixture: (x_0 (n, d) float64, component labels (n,))."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)  # (n, d)
        x_all = torch.einsum("ne,kde->knd", z, self.sqrt_cov) + self.means[:, None, :]  # (K, n, d)
        return x_all[labels, torch.arange(n)], labels

    def sample_noised(self, n: int, sigma: float, generator: torch.Generator) -> Tensor:
        """n exact draws from the noised marginal p_sigma, float32 (n, d): x_0 + sigma * eps."""
        x0, _ = self.sample(n, generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (x0 + sigma * eps).float()

    # ----------------------------------------------------------------------------------------------
    # The exact posterior
    # ----------------------------------------------------------------------------------------------

    def _eigen_coords(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """y_k = U_k^T (x - mu_k) (K, B, d) and the noised variances lambda_k + sigma^2 (K, B, d),
        or (K, 1, d) when the whole batch shares one sigma (the usual case; saves the logs)."""
        y = torch.einsum("bd,kde->kbe", x.double(), self.U) - self.mean_U[:, None, :]  # (K, B, d)
        s2 = sigma.double() ** 2  # (B,)
        if bool((s2 == s2[0]).all()):
            s2 = s2[:1]
        return y, self.lam[:, None, :] + s2[None, :, None]

    def _log_joint(self, y: Tensor, var: Tensor) -> Tensor:
        """log w_k + log N(x; mu_k, Sigma_k + sigma^2 I), (K, B), from the eigen coordinates."""
        log_n = -0.5 * (_sum_last(torch.log(2 * math.pi * var)) + _sum_last(y * y / var))  # (K, B)
        return self.weights.log()[:, None] + log_n

    def log_responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log r_k(x) under p_sigma, (B, K) float64. sigma: a float or (B,)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        log_joint = self._log_joint(*self._eigen_coords(x, sigma))  # (K, B)
        return (log_joint - log_joint.logsumexp(0, keepdim=True)).T

    def denoise64(self, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x, sigma) = E[x_0 | x] in float64: x (B, d), sigma (B,) -> (B, d)."""
        y, var = self._eigen_coords(x, sigma)
        r = torch.softmax(self._log_joint(y, var), dim=0)  # (K, B)
        shrunk = self.lam[:, None, :] / var * y  # (K, B, d): diag(lam / (lam + sigma^2)) y_k
        post_means = torch.einsum("kbe,kde->kbd", shrunk, self.U) + self.means[:, None, :]  # (K, B, d)
        return (r[:, :, None] * post_means).sum(0)

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The exact denoiser as a sampler sees it, in x's dtype (float32 like a network); sigma a float or (B,)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        return self.denoise64(x, sigma).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Mixtures used by the tests and the benchmark
# --------------------------------------------------------------------------------------------------


def rotation_2d(angle: float) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def toy_mixture_2d() -> GaussianMixture:
    """Three well-separated 2-D components with distinct weights and tilted anisotropic covariances.

    Standard deviations lie in [0.3, 0.8], so the last denoising step from sigma_min <= 0.04 shrinks a
    variance by at most sigma_min^2 / lambda_min ~ 2% (below the Monte-Carlo noise of the tests), and
    the means are >= 5.5 apart (7 of the widest standard deviation), so the sigma = 0
    responsibilities are practically hard labels."""
    means = torch.tensor([[-3.0, 0.0], [2.5, 2.5], [2.0, -3.0]], dtype=torch.float64)
    stds = torch.tensor([[0.8, 0.3], [0.5, 0.35], [0.7, 0.4]], dtype=torch.float64)
    angles = [0.5, -0.9, 1.6]
    covs = torch.stack([rotation_2d(a) @ torch.diag(s**2) @ rotation_2d(a).T for a, s in zip(angles, stds)])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs)


def random_mixture(dim: int, num_components: int, seed: int = 0, *, mean_scale: float = 1.0,
                   var_range: tuple[float, float] = (0.1, 1.0)) -> GaussianMixture:
    """Random full covariances Q diag(lambda) Q^T with lambda log-uniform in ``var_range`` (condition
    number var_range[1] / var_range[0]), means ~ N(0, mean_scale^2 I), weights from 1, 2, ..., K."""
    g = torch.Generator().manual_seed(seed)
    means = mean_scale * torch.randn(num_components, dim, generator=g, dtype=torch.float64)
    lo, hi = math.log(var_range[0]), math.log(var_range[1])
    lam = (lo + (hi - lo) * torch.rand(num_components, dim, generator=g, dtype=torch.float64)).exp()
    q, _ = torch.linalg.qr(torch.randn(num_components, dim, dim, generator=g, dtype=torch.float64))
    covs = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
    covs = (covs + covs.transpose(1, 2)) / 2
    weights = torch.arange(1, num_components + 1, dtype=torch.float64)
    return GaussianMixture(weights, means, covs)


# --------------------------------------------------------------------------------------------------
# The exact denoiser as a discrete-time network
# --------------------------------------------------------------------------------------------------


def as_network(denoise64: Denoiser64, schedule: DiscreteSchedule,
               prediction: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Present D as the network ``model(x_vp, t)`` of a prediction type, for ``unfog.diffusion.Denoiser``.

    The network reads its noise level from the timestep, sigma = schedule.t_to_sigma(t), undoes the
    VP scaling, x = sqrt(1 + sigma^2) x_vp, and returns (Salimans & Ho 2022, eq. 6)

        eps = (x - D) / sigma,   x0 = D,   v = alpha eps - sigma_vp x0,
        alpha = 1 / sqrt(1 + sigma^2),   sigma_vp = sigma / sqrt(1 + sigma^2).

    At fractional t (Karras-type spacings) t_to_sigma interpolates sigma linearly while sigma_to_t
    interpolates log(sigma), so the network's sigma differs slightly from the sampler's, as it would
    for a real network trained on integer timesteps; on integer timesteps the round trip is exact."""
    if prediction not in ("eps", "v", "x0"):
        raise ValueError(f"unknown prediction type {prediction!r}; valid choices: eps, v, x0")

    def network(x_vp: Tensor, t: Tensor) -> Tensor:
        t = t.double()
        if bool((t == t[0]).all()):  # one timestep for the batch: interpolate once
            t = t[:1]
        sigma = schedule.t_to_sigma(t).expand(x_vp.shape[0])  # (B,)
        scale = (1 + sigma**2).sqrt()[:, None]  # (B, 1)
        x = x_vp.double() * scale  # (B, d)
        x0 = denoise64(x, sigma)
        if prediction == "x0":
            return x0.float()
        eps = (x - x0) / sigma[:, None]
        if prediction == "eps":
            return eps.float()
        return ((eps - sigma[:, None] * x0) / scale).float()

    return network


# --------------------------------------------------------------------------------------------------
# A float64 reference solver of the probability-flow ODE, independent of unfog's samplers
# --------------------------------------------------------------------------------------------------


def solve_pf_ode(denoise64: Denoiser64, x: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float,
                 steps_per_unit: int = 12) -> Tensor:
    """Integrate dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4) from sigma_from
    to sigma_to > 0 with classical RK4 in u = log(sigma), where it reads dx/du = x - D(x, e^u).

    sigma_from and sigma_to may differ per sample (B,); every sample takes the same number of steps,
    ``steps_per_unit`` per unit of log(sigma) over the longest range. Float64 in and out."""
    x = x.double()
    u0 = torch.as_tensor(sigma_from, dtype=torch.float64).expand(x.shape[0]).log()  # (B,)
    u1 = torch.as_tensor(sigma_to, dtype=torch.float64).expand(x.shape[0]).log()  # (B,)
    n = max(1, math.ceil(steps_per_unit * float((u0 - u1).abs().max())))
    du = (u1 - u0) / n  # (B,)
    col = du[:, None]

    def f(x: Tensor, u: Tensor) -> Tensor:
        return x - denoise64(x, u.exp())

    u = u0
    for _ in range(n):
        k1 = f(x, u)
        k2 = f(x + col / 2 * k1, u + du / 2)
        k3 = f(x + col / 2 * k2, u + du / 2)
        k4 = f(x + col * k3, u + du)
        x = x + col / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        u = u + du
    return x


def consistency_function(gmm: GaussianMixture, sigma_end: float = 1e-2, steps_per_unit: int = 4) -> Denoiser64:
    """The exact consistency function f(x, sigma) (Song et al. 2023, eq. 3): the end point at sigma = 0
    of the probability-flow ODE through (x, sigma). It maps p_sigma onto p_0 exactly, which the
    posterior mean E[x_0 | x] does not. The ODE is solved to sigma_end, then D(., sigma_end) takes
    the last step (from sigma itself if that is lower). Its variance shrink sigma_end^2 / lambda_min
    (~1e-3 here) and the RK4 error at 4 steps per unit of log(sigma) (median ~1e-4) are far below
    a distribution test's noise."""

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        sigma_last = sigma.double().clamp(max=sigma_end)  # below sigma_end: D(x, sigma) directly
        x_end = solve_pf_ode(gmm.denoise64, x, sigma, sigma_last, steps_per_unit)
        return gmm.denoise64(x_end, sigma_last)

    return f


# --------------------------------------------------------------------------------------------------
# How far a sample set is from the mixture
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixtureError:
    """Per-component moment errors of a sample set, each the max over components k.

    weight:   |n_k / n - w_k|, with n_k = sum_i r_k(x_i) (exact responsibilities at sigma = 0)
    mean:     Mahalanobis distance || Sigma_k^{-1/2} (m_k - mu_k) ||   (dimensionless)
    cov:      || C_k - Sigma_k ||_F / || Sigma_k ||_F                   (relative Frobenius)
    variance: | tr(Sigma_k^{-1} C_k) / d - 1 |   (mean whitened variance: sensitive to a uniform
              shrink or inflation that the Frobenius error, noisy in high d, would hide)
    """

    weight: float
    mean: float
    cov: float
    variance: float

    def __str__(self) -> str:
        return f"weight {self.weight:.4f}  mean {self.mean:.4f}  cov {self.cov:.4f}  variance {self.variance:.4f}"


def mixture_error(gmm: GaussianMixture, samples: Tensor) -> MixtureError:
    """Soft-assign samples to components by exact posterior responsibility at sigma = 0 and compare
    the weighted weights, means and covariances with the mixture's. NaNs propagate (a diverged
    sampler reports nan, which fails every tolerance)."""
    x = samples.double()  # (n, d)
    r = gmm.log_responsibilities(x).exp()  # (n, K)
    n_k = r.sum(0)  # (K,)
    m = (r.T @ x) / n_k[:, None]  # (K, d)
    xc = x[None] - m[:, None, :]  # (K, n, d)
    c = torch.einsum("kn,knd,kne->kde", r.T, xc, xc) / n_k[:, None, None]  # (K, d, d)
    weight = (n_k / x.shape[0] - gmm.weights).abs()
    dm = torch.einsum("kd,kde->ke", m - gmm.means, gmm.U) / gmm.lam.sqrt()  # whitened mean error
    cov = torch.linalg.matrix_norm(c - gmm.covs) / torch.linalg.matrix_norm(gmm.covs)
    whitened_var = torch.einsum("kdf,kde,kef,kf->k", gmm.U, c, gmm.U, 1 / gmm.lam) / gmm.dim
    values = (weight.max(), dm.norm(dim=-1).max(), cov.max(), (whitened_var - 1).abs().max())
    return MixtureError(*(float(v) for v in values))


def _distance_sum(a: Tensor, b: Tensor, chunk: int = 1024) -> float:
    """sum_ij ||a_i - b_j|| in float64, in chunks to bound memory."""
    a, b = a.double(), b.double()
    return sum(float(torch.cdist(a[i : i + chunk], b).sum()) for i in range(0, a.shape[0], chunk))


def _self_term(a: Tensor) -> float:
    """E||X - X'|| over distinct pairs i != j (the diagonal is zero), the unbiased estimate."""
    n = a.shape[0]
    return _distance_sum(a, a) / (n * (n - 1))


class EnergyDistanceTo:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (Szekely & Rizzo 2013) of sample
    sets X to one fixed reference set Y, whose self-term is computed once.

    The U-statistic: self-terms average over distinct pairs only, so it is unbiased (zero in
    expectation for equal distributions, and may come out slightly negative); the plain
    V-statistic would carry a bias of (E||X - X'|| + E||Y - Y'||) / n, large in high dimension.
    A NaN sample gives nan."""

    def __init__(self, reference: Tensor):
        self.reference = reference.double()
        self.self_term = _self_term(self.reference)

    def __call__(self, samples: Tensor) -> float:
        cross = _distance_sum(samples, self.reference) / (samples.shape[0] * self.reference.shape[0])
        return 2 * cross - _self_term(samples) - self.self_term


def energy_distance(a: Tensor, b: Tensor) -> float:
    """The energy distance of :class:`EnergyDistanceTo` between two sample sets."""
    return EnergyDistanceTo(b)(a)
