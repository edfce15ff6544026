"""Exponential-integrator samplers: DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models") and UniPC (Zhao et al. 2023).

They integrate the probability-flow ODE in the log-SNR variable lambda = -log(sigma), where its
linear part is solved exactly and only the denoiser is approximated by a polynomial. With
h = lambda_next - lambda, the first-order step is

    x_next = (sigma_next / sigma) x + (1 - e^{-h}) D(x, sigma)         (DPM-Solver++ eq. 9)

and higher orders correct D with finite differences of earlier (multistep) or intermediate
(singlestep) denoiser outputs. The SDE variants (Lu et al. 2022, sec. 4.2 and app. C; Gonzalez et
al. 2023 for 3M) add fresh noise. Signatures as in ``samplers``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .denoiser import DenoiserFn
from .samplers import Stepper, ancestral_step
from ..choices import check_choice

SOLVER_TYPES = ("midpoint", "heun")
UNIPC_VARIANTS = ("bh1", "bh2")


def _first_order(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """x_next = (sigma_next / sigma) x + (1 - e^{-h}) D, which is D itself at sigma_next = 0."""
    if sigma_next == 0:
        return denoised
    return (sigma_next / sigma) * x + (1 - sigma_next / sigma) * denoised


def sample_dpmpp_2m(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                    generator=None, noise_sampler=None, solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second order from the previous denoiser
    output, D + c (D - D_prev) / r with r = h_prev / h and c = (1 - e^{-h}) / 2 ("midpoint", the
    paper) or c = phi_2(h) = (e^{-h} - 1) / h + 1 ("heun"). First order on the first step and on
    the last step to sigma = 0."""
    check_choice("solver type", solver_type, SOLVER_TYPES)
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    old, h_last = None, None
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        x_first = _first_order(x, denoised, sigma, sigma_next)
        if old is None or sigma_next == 0:
            x = x_first
        else:
            h = math.log(sigma / sigma_next)
            d1 = (denoised - old) * (h / h_last)
            coef = -math.expm1(-h) / 2 if solver_type == "midpoint" else math.expm1(-h) / h + 1
            x = x_first + coef * d1
        old = denoised
        h_last = math.log(sigma / sigma_next) if sigma_next > 0 else None
    return x


def sample_dpmpp_2m_sde(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                        generator=None, noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, app. C, eq. for the data-prediction SDE solver):
    with eta = 1 the step is x_next = (sigma_next / sigma) e^{-h} x + (1 - e^{-2h}) D + ...
    + sigma_next sqrt(1 - e^{-2h}) z; eta = 0 gives the ODE solver."""
    check_choice("solver type", solver_type, SOLVER_TYPES)
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    old, h_last = None, None
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x, old = denoised, denoised
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
        if old is not None:
            d1 = (denoised - old) * (h / h_last)
            if solver_type == "midpoint":
                x = x - 0.5 * math.expm1(-h - eta_h) * d1
            else:
                x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * d1  # phi_2 at eta = 0
        if eta > 0:
            x = x + run.noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old, h_last = denoised, h
    return x


def sample_dpmpp_3m_sde(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                        generator=None, noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE: the third-order multistep data-prediction solver (Lu et al. 2022,
    app. B) with the SDE noise of 2M SDE. Warm-up steps use orders 1 and 2 (phi_2 form); the last
    step to sigma = 0 is first order. eta = 0 gives the deterministic 3M solver."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    hist: list[tuple[Tensor, float]] = []  # (denoised, h) of earlier steps, newest first
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if len(hist) >= 2:
            (d_1, h_1), (d_2, h_2) = hist[0], hist[1]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif len(hist) == 1:
            d_1, h_1 = hist[0]
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        if eta > 0:
            x = x + run.noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        hist = [(denoised, h)] + hist[:1]
    return x


def sample_dpmpp_2s_ancestral(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                              generator=None, noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1, r = 1/2): a first-order step to the midpoint
    in lambda, then the full step with the midpoint's denoiser output; ancestral noise on top
    (k-diffusion's "DPM++ 2S a"). eta = 0 gives the deterministic singlestep solver."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(sigma * down)  # lambda midpoint
            x_mid = _first_order(x, denoised, sigma, sigma_mid)
            x = _first_order(x, run.denoise(x_mid, sigma_mid), sigma, down)
        if up > 0:
            x = x + run.noise(sigma, sigma_next) * (s_noise * up)
    return x


def singlestep_orders(steps: int) -> list[int]:
    """Orders per step of diffusers' DPMSolverSinglestepScheduler (order 2, lower_order_final):
    pairs [1, 2] where the 2 completes a two-stage step, ending with first-order steps."""
    orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    return orders[:steps]


def sample_dpmpp_2s(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                    generator=None, noise_sampler=None) -> Tensor:
    """DPM-Solver++(2S) with its intermediate points on the sigma grid, as diffusers'
    DPMSolverSinglestepScheduler lays it out: each pair of grid intervals sigma_a -> sigma_b ->
    sigma_c is one two-stage step from sigma_a to sigma_c that evaluates D at sigma_a and at
    sigma_b (reached by a first-order step); D_d = D_a + (D_b - D_a) / (2 r), r = h_ab / h_ac."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    orders = singlestep_orders(len(run.sigmas) - 1)
    x_start, d_start = x, None
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if orders[i] == 1:
            x_start, d_start = x, denoised
            x = _first_order(x, denoised, sigma, sigma_next)
            continue
        sigma_a = run.sigmas[i - 1]
        r = math.log(sigma_a / sigma) / math.log(sigma_a / sigma_next)
        d = d_start + (denoised - d_start) / (2 * r)
        x = _first_order(x_start, d, sigma_a, sigma_next)
    return x


def sample_dpmpp_sde(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                     generator=None, noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 0.5) -> Tensor:
    """DPM-Solver++ SDE (k-diffusion's "DPM++ SDE"): a two-stage stochastic step with the
    intermediate at lambda + r h. The two noise draws of a step are increments of one Brownian
    path (intervals [sigma, sigma_s] and [sigma, sigma_next] share their first part), as the
    Brownian-tree noise of k-diffusion makes them."""
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_s = sigma * (sigma_next / sigma) ** r  # lambda_s = lambda + r h
        z1 = run.noise(sigma, sigma_s)
        z2 = run.noise(sigma_s, sigma_next)
        a, b = sigma - sigma_s, sigma_s - sigma_next
        z12 = (math.sqrt(a) * z1 + math.sqrt(b) * z2) / math.sqrt(a + b)  # increment over [sigma, sigma_next]
        down, up = ancestral_step(sigma, sigma_s, eta)
        x_s = _first_order(x, denoised, sigma, down) + z1 * (s_noise * up)
        denoised_s = run.denoise(x_s, sigma_s)
        fac = 1 / (2 * r)
        d = (1 - fac) * denoised + fac * denoised_s
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = _first_order(x, d, sigma, down) + z12 * (s_noise * up)
    return x


def _unipc_coefficients(rks: list[float], h: float, order: int, variant: str) -> tuple[Tensor, Tensor, float, float]:
    """The UniPC linear system (Zhao et al. 2023, Algorithm 3 / eq. 8, data prediction):
    rows R[k] = r^k and right-hand side b_k = k! phi_{k+1}(h) / B(h), with B(h) = h (bh1) or
    e^h - 1 (bh2), in the sign convention hh = -h. Returns (R, b, B(h), h phi_1)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial, rows, rhs = h_phi_1 / hh - 1, 1, [], []
    r = torch.tensor(rks + [1.0], dtype=torch.float64)
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.tensor(rhs, dtype=torch.float64), b_h, h_phi_1


def _unipc_update(x: Tensor, history: list[Tensor], lambdas: list[float], sigmas: list[float], i: int,
                  order: int, variant: str, new: Tensor | None = None) -> Tensor:
    """One UniP predictor step (``new`` is None) or UniC corrector step from sigma_i to
    sigma_{i+1}. ``history`` holds denoiser outputs at sigma_i, sigma_{i-1}, ... (newest first);
    the corrector also uses ``new``, the denoiser output at the point it corrects."""
    x_first = _first_order(x, history[0], sigmas[i], sigmas[i + 1])
    if order == 1 and new is None:
        return x_first
    h = lambdas[i + 1] - lambdas[i]
    rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, order)]
    d1s = [(history[k] - history[0]) / rks[k - 1] for k in range(1, order)]
    R, b, b_h, _ = _unipc_coefficients(rks, h, order, variant)
    if new is None:  # predictor: order - 1 coefficients; Zhao et al. fix rho = 1/2 at order 2
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_first - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    res = sum((r * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(x)) + rhos[-1] * (new - history[0])
    return x_first - b_h * res


def sample_unipc(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, extra_args=None, callback=None,
                 generator=None, noise_sampler=None, order: int = 2, variant: str = "bh2",
                 corrector: bool = True) -> Tensor:
    """UniPC (Zhao et al. 2023, Algorithms 2-3), data prediction: a multistep predictor UniP of
    the given order, then, once the denoiser has been evaluated at the predicted point, the
    corrector UniC raises the accuracy by one order at no extra evaluation. ``variant`` picks
    B(h) = h ("bh1") or e^h - 1 ("bh2"). The order is lowered during warm-up and towards the end
    (the last step to sigma = 0 is first order), as diffusers' UniPCMultistepScheduler does."""
    check_choice("UniPC variant", variant, UNIPC_VARIANTS)
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    run = Stepper(denoiser, x, sigmas, extra_args, callback, generator, noise_sampler)
    lambdas = [-math.log(s) if s > 0 else math.inf for s in run.sigmas]
    n = len(run.sigmas) - 1
    history: list[Tensor] = []
    x_last, last_order = None, 1
    for i in run.steps:
        denoised = run.denoise(x, run.sigmas[i])
        run.report(i, x, denoised)
        if corrector and x_last is not None:
            x = _unipc_update(x_last, history, lambdas, run.sigmas, i - 1, last_order, variant, new=denoised)
        history = [denoised] + history[: order - 1]
        last_order = min(order, n - i, i + 1)
        x_last = x
        x = _unipc_update(x, history, lambdas, run.sigmas, i, last_order, variant)
    return x
