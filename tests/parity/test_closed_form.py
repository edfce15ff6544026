"""Closed-form proof that every sampler is right.

Data from a Gaussian mixture has an exact denoiser D(x, sigma) = E[x_0 | x] (tests/closed_form/gmm.py),
so a sampler driven by it must reproduce the mixture, up to its discretisation error and the
Monte-Carlo noise of a finite sample set. Nothing is trained. The exact D is handed to unfog's
`Denoiser` as a discrete-time eps / v / x0 network of (x_vp, t), so the prediction-type and timestep
plumbing is under test too.

    * every registered sampler x prediction type x beta schedule reproduces a 2-D mixture;
    * every sampler reproduces a 64-D mixture (one prediction type and schedule each);
    * the ODE solvers converge to an independent float64 RK4 solution, at their orders;
    * the stochastic samplers' distribution error falls with the number of steps;
    * LCM is exact given the exact consistency function; given the posterior mean it follows a
      closed form of its own, which is not the data distribution (derived in its test);
    * v-prediction sampling on the zero-terminal-SNR schedule.

Tolerances are the exact-vs-exact noise floor at the test's sample size (the 99.9th percentile over
hundreds of seeds; numbers below) plus a stated allowance for discretisation error. Step counts are
chosen so that each sampler's discretisation error, measured with 10x the samples, is within the
allowance. Spacing is Karras et al.'s (rho = 7) over each schedule's full sigma range, which also
exercises fractional timesteps in the wrapper.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of the closed_form oracle
from closed_form.gmm import (  # noqa: E402
    EnergyDistanceTo,
    GaussianMixture,
    MixtureError,
    as_network,
    consistency_function,
    mixture_error,
    random_mixture,
    solve_pf_ode,
    toy_mixture_2d,
)

from unfog.diffusion import PREDICTIONS, SAMPLERS, Denoiser, DiscreteSchedule, get_sigmas, sample  # noqa: E402

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACING = "karras"

# --- 2-D: every sampler x prediction x schedule -------------------------------------------------
N_2D = 4000
# Exact-vs-exact floor of `mixture_error` at n = 4000 (99.9th percentile over 400 seeds):
#   weight 0.027, mean 0.156, cov 0.159, variance 0.091 (medians 0.009, 0.052, 0.059, 0.036),
# plus an allowance for discretisation error of 0.01 (weight) and 0.05 (the others).
TOL_2D = MixtureError(weight=0.027 + 0.01, mean=0.156 + 0.05, cov=0.159 + 0.05, variance=0.091 + 0.05)
# Steps per sampler. First-order samplers have O(1/steps) bias: the ancestral ones (DDPM's
# "fixed_small" variance ignores Var[x_0 | x_t], Bao et al. 2022) need 500 steps to bring the
# variance error under 0.05 on every schedule; Euler/DDIM 200. The rest are second order or
# better and need 100 (cosine's sigma range, 4096 -> 0.0064, puts 3x fewer Karras steps where the
# data scale is than scaled_linear's; 100 steps hold all three schedules within the allowance;
# DPM2 ancestral, 0.043 there at 100 steps, gets 150 for margin).
# LCM's steps each jump to sigma = 0; with 3 it re-noises at sigma ~ 1 and at sigma_min.
STEPS_2D = {"ddpm": 500, "euler_ancestral": 500, "euler": 200, "ddim": 200, "dpm_2_ancestral": 150, "lcm": 3}
DEFAULT_STEPS_2D = 100

# --- 64-D: every sampler once -------------------------------------------------------------------
N_64D = 2000
# Floor at n = 2000 (99.9th percentile over 300 seeds): weight 0.035, mean 0.577 (Mahalanobis,
# ~sqrt(d / n_k)), cov 0.403 (relative Frobenius: dominated by estimating 64x64 covariances from
# ~330 samples), variance 0.029; energy distance (unbiased U-statistic, to a fixed exact set):
# mean 0.002, std 0.004, max over 150 seeds 0.0174. Allowances as in 2-D (0.01 on weights, 0.05
# otherwise; 0.01 on the energy distance). "variance" (the whitened trace) is the sharp
# covariance check here.
TOL_64D = MixtureError(weight=0.035 + 0.01, mean=0.577 + 0.05, cov=0.403 + 0.05, variance=0.029 + 0.05)
ED_TOL_64D = 0.018 + 0.01
# (prediction, schedule, steps) per sampler; each of the 9 (prediction, schedule) pairs at least
# once (checked below). Cosine goes to cheap high-order solvers, since it needs twice the steps.
# Variance bias measured with 8000 samples: DDPM / Euler ancestral 0.044 at 300 steps, Euler /
# DDIM 0.033 at 100, all others <= 0.03.
CASES_64D = {
    "ddpm": ("eps", "linear", 300),
    "ddim": ("eps", "scaled_linear", 100),
    "lms": ("eps", "cosine", 100),
    "dpm_2": ("v", "linear", 50),
    "euler": ("v", "scaled_linear", 100),
    "unipc": ("v", "cosine", 100),
    "euler_ancestral": ("x0", "linear", 300),
    "dpmpp_3m_sde": ("x0", "scaled_linear", 50),
    "dpmpp_2m": ("x0", "cosine", 100),
    "heun": ("x0", "scaled_linear", 50),
    "dpm_2_ancestral": ("eps", "scaled_linear", 50),
    "dpmpp_2s_ancestral": ("v", "linear", 50),
    "dpmpp_2s": ("eps", "linear", 50),
    "dpmpp_sde": ("v", "scaled_linear", 50),
    "dpmpp_2m_sde": ("eps", "scaled_linear", 50),
    "lcm": ("v", "scaled_linear", 3),
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def mixture_2d() -> GaussianMixture:
    return toy_mixture_2d()


@pytest.fixture(scope="module")
def mixture_64d() -> GaussianMixture:
    return random_mixture(64, 3, seed=0)


def assert_within(err: MixtureError, tol: MixtureError, label: str) -> None:
    fields = ("weight", "mean", "cov", "variance")
    bad = [f"{f} {getattr(err, f):.4f} > {getattr(tol, f):.4f}"
           for f in fields if not getattr(err, f) <= getattr(tol, f)]  # `not <=`: nan fails too
    assert not bad, f"{label}: {', '.join(bad)}  ({err})"


def run_sampler(gmm: GaussianMixture, name: str, prediction: str, schedule_kind: str, steps: int, n: int,
                seed: int = 0, *, spacing: str = SPACING, zero_terminal_snr: bool = False, **options) -> torch.Tensor:
    """Sample n points with the exact denoiser behind a `prediction` network, starting from exact draws
    of p_sigma at sigmas[0]. LCM gets the exact consistency function instead (see test_lcm_*)."""
    schedule = DiscreteSchedule.make(schedule_kind, zero_terminal_snr=zero_terminal_snr)
    oracle = consistency_function(gmm) if name == "lcm" else gmm.denoise64
    denoiser = Denoiser(as_network(oracle, schedule, prediction), schedule, prediction)
    sigmas = get_sigmas(schedule, steps, spacing)
    g = torch.Generator().manual_seed(seed)
    x = gmm.sample_noised(n, float(sigmas[0]), g)
    return sample(denoiser, x, sigmas, name, generator=g, **options)


# --------------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------------


def test_oracle_denoiser_is_tweedie(mixture_2d):
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie's formula), with the gradient taken by
    autograd through torch.distributions -- a code path independent of the eigendecomposition."""
    gmm = mixture_2d
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    for sigma in (0.05, 0.7, 5.0):
        xg = x.clone().requires_grad_(True)
        eye = torch.eye(2, dtype=torch.float64)
        comps = [torch.distributions.MultivariateNormal(gmm.means[k], gmm.covs[k] + sigma**2 * eye) for k in range(3)]
        log_p = torch.stack([gmm.weights[k].log() + c.log_prob(xg) for k, c in enumerate(comps)]).logsumexp(0)
        (grad,) = torch.autograd.grad(log_p.sum(), xg)
        d = gmm.denoise64(x, torch.full((64,), sigma, dtype=torch.float64))
        torch.testing.assert_close(d, x + sigma**2 * grad, rtol=1e-9, atol=1e-9)


def test_prediction_types_give_the_exact_denoiser(mixture_2d):
    """Through the `Denoiser` wrapper, the eps, v and x0 networks built from D all give back D, at
    the integer and the fractional timesteps a sampler visits, on every schedule."""
    gmm = mixture_2d
    for kind in SCHEDULES:
        schedule = DiscreteSchedule.make(kind)
        denoisers = {p: Denoiser(as_network(gmm.denoise64, schedule, p), schedule, p) for p in PREDICTIONS}
        for spacing in ("karras", "leading"):
            for sigma in get_sigmas(schedule, 25, spacing)[:-1].tolist():
                x = gmm.sample_noised(256, sigma, torch.Generator().manual_seed(1))
                exact = gmm.denoise(x, torch.tensor(sigma))
                for prediction, denoiser in denoisers.items():
                    # float32 rounding, scaled back by sigma for eps and v (observed <= 4e-7 (1 + sigma));
                    # the network's sigma (t_to_sigma, linear in t) is within 6e-5 of the sampler's
                    got = denoiser(x, torch.tensor(sigma))
                    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * (1 + sigma),
                                               msg=f"{kind} {prediction} sigma={sigma}")


# --------------------------------------------------------------------------------------------------
# Every sampler reproduces the mixture
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_kind", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_reproduces_2d_mixture(mixture_2d, name, prediction, schedule_kind):
    steps = STEPS_2D.get(name, DEFAULT_STEPS_2D)
    out = run_sampler(mixture_2d, name, prediction, schedule_kind, steps, N_2D)
    assert_within(mixture_error(mixture_2d, out), TOL_2D, f"{name}/{prediction}/{schedule_kind}/{steps} steps")


def test_64d_cases_cover_everything():
    assert set(CASES_64D) == set(SAMPLERS)
    assert {(p, s) for p, s, _ in CASES_64D.values()} == {(p, s) for p in PREDICTIONS for s in SCHEDULES}


@pytest.fixture(scope="module")
def energy_distance_64d(mixture_64d):
    reference, _ = mixture_64d.sample(N_64D, torch.Generator().manual_seed(12345))
    return EnergyDistanceTo(reference)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_reproduces_64d_mixture(mixture_64d, energy_distance_64d, name):
    prediction, schedule_kind, steps = CASES_64D[name]
    out = run_sampler(mixture_64d, name, prediction, schedule_kind, steps, N_64D)
    label = f"{name}/{prediction}/{schedule_kind}/{steps} steps"
    assert_within(mixture_error(mixture_64d, out), TOL_64D, label)
    ed = energy_distance_64d(out)
    assert ed <= ED_TOL_64D, f"{label}: energy distance {ed:.4f} > {ED_TOL_64D:.4f}"


# --------------------------------------------------------------------------------------------------
# Convergence with the number of steps
# --------------------------------------------------------------------------------------------------

CONVERGENCE_STEPS = (5, 10, 20, 40)
# name, options, order it shows over 10 -> 40 steps. The warm-up steps of the multistep solvers
# (LMS, 3M) are first order, so asymptotically they fall back to order 2; over this range they
# show 3 or more, as does UniPC (order-2 predictor + corrector).
ODE_SOLVERS = [
    ("euler", {}, 1),
    ("ddim", {}, 1),
    ("heun", {}, 2),
    ("dpm_2", {}, 2),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_2m", {"solver_type": "heun"}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2),
    ("dpmpp_2s", {}, 2),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_sde", {"eta": 0.0}, 2),
    ("lms", {}, 3),
    ("dpmpp_3m_sde", {"eta": 0.0}, 3),
    ("unipc", {}, 3),
    ("unipc", {"variant": "bh1"}, 3),
]
# The observed order log_4(e(10) / e(40)) must be at least p - 1/2, i.e. e(10) / e(40) >= 2, 8, 32
# for p = 1, 2, 3 (nominally 4, 16, 64). Observed: 4.1 (Euler, DDIM), 11.6 (DPM++(2S)) to 25
# (DPM++(2M)) for second order, 56 (UniPC) to 188 (DPM++(3M)) for third.
MIN_RATIO = {p: 4 ** (p - 0.5) for p in (1, 2, 3)}


@pytest.fixture(scope="module")
def ode_problem(mixture_2d):
    """1000 starting points at sigma_max and their exact ODE end points at sigma_min.

    The grid stops at sigma_min (the 0 dropped): every solver then approximates the same ODE
    solution, while the final jump to 0 (x <- D(x, sigma_min) for most, an extrapolation for LMS)
    is not part of the ODE. The reference is RK4 in log(sigma) in float64 (end-point error ~3e-8).
    Samplers get the exact VE denoiser directly: through a discrete-time network sigma(t) has
    kinks at integer timesteps, which would blur the observed orders."""
    schedule = DiscreteSchedule.make("scaled_linear")
    x = mixture_2d.sample_noised(1000, schedule.sigma_max, torch.Generator().manual_seed(0))
    reference = solve_pf_ode(mixture_2d.denoise64, x, schedule.sigma_max, schedule.sigma_min, steps_per_unit=24)
    return schedule, x, reference


@pytest.fixture(scope="module")
def ode_errors(mixture_2d, ode_problem):
    """errors(name, options): the median over samples of |x_N - x_exact| at each of CONVERGENCE_STEPS
    (the median ignores the few trajectories near a boundary between components that a coarse
    solver sends to the other side). Cached: the Euler baseline is used by several tests."""
    schedule, x, reference = ode_problem
    cache: dict = {}

    def errors(name: str, options: dict) -> list[float]:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = []
            for steps in CONVERGENCE_STEPS:
                sigmas = get_sigmas(schedule, steps + 1, SPACING)[:-1]  # steps + 1 levels down to sigma_min
                out = sample(mixture_2d.denoise, x, sigmas, name, **options)
                cache[key].append(float((out.double() - reference).norm(dim=1).median()))
        return cache[key]

    return errors


@pytest.mark.parametrize("name,options,order", ODE_SOLVERS, ids=[f"{n}-{o}" if o else n for n, o, _ in ODE_SOLVERS])
def test_ode_solver_converges_at_its_order(ode_errors, name, options, order):
    errors = ode_errors(name, options)
    assert all(a > b for a, b in zip(errors, errors[1:])), f"{name}: errors not decreasing: {errors}"
    ratio = errors[1] / errors[3]
    assert ratio >= MIN_RATIO[order], f"{name}: e(10)/e(40) = {ratio:.1f} < {MIN_RATIO[order]:.0f} (errors {errors})"


def test_higher_order_solvers_beat_euler(ode_errors):
    """At 40 steps every second-order-or-better solver is at least 5x closer to the exact solution
    than Euler (observed: 7.7x for DPM++(2S), 13x for DPM++(2M), 110x for UniPC)."""
    euler = ode_errors("euler", {})[3]
    for name, options, order in ODE_SOLVERS:
        if order >= 2:
            err = ode_errors(name, options)[3]
            assert err < euler / 5, f"{name} {options}: {err:.2e} vs Euler {euler:.2e}"


STOCHASTIC = [
    ("ddpm", {}),
    ("euler_ancestral", {}),
    ("ddim", {"eta": 1.0}),
    ("dpm_2_ancestral", {}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_sde", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_3m_sde", {}),
]
# Energy distance (unbiased) of n = 4000 samples to a fixed exact set of 4000, exact vs exact:
# mean -0.0001, std 0.0016, 99th percentile 0.0064, max over 150 seeds 0.0085.
ED_FLOOR_2D = 0.01


@pytest.fixture(scope="module")
def energy_distance_2d(mixture_2d):
    reference, _ = mixture_2d.sample(N_2D, torch.Generator().manual_seed(99))
    return EnergyDistanceTo(reference)


@pytest.mark.parametrize("name,options", STOCHASTIC, ids=[f"{n}-{o}" if o else n for n, o in STOCHASTIC])
def test_stochastic_sampler_improves_with_steps(mixture_2d, energy_distance_2d, name, options):
    """At 4 steps the distribution error is well above the noise floor (observed 0.028 for
    DPM++ SDE to 1.8 for DPM2 ancestral); at 100 steps it is at the floor (observed |d| <= 0.002)."""
    few, many = (energy_distance_2d(run_sampler(mixture_2d, name, "eps", "scaled_linear", steps, N_2D, seed=7,
                                                **options)) for steps in (4, 100))
    assert many <= ED_FLOOR_2D, f"{name}: energy distance at 100 steps {many:.4f} > floor {ED_FLOOR_2D}"
    assert few > 1.5 * ED_FLOOR_2D, f"{name}: energy distance at 4 steps {few:.4f} is within the noise"


# --------------------------------------------------------------------------------------------------
# LCM: exact for the consistency function, not for the posterior mean
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", (1, 4))
def test_lcm_is_exact_with_the_consistency_function(mixture_2d, steps):
    """LCM steps x <- f(x, sigma) + sigma_next z. If f maps p_sigma onto p_0 -- the consistency
    function, the probability-flow ODE's end point, which is what LCM distils -- then f(x) ~ p_0 and
    f(x) + sigma_next z ~ p_sigma_next: every step is exact, for any number of steps."""
    out = run_sampler(mixture_2d, "lcm", "x0", "scaled_linear", steps, N_2D, seed=3, spacing="trailing")
    assert_within(mixture_error(mixture_2d, out), TOL_2D, f"lcm/{steps} steps")


@pytest.mark.parametrize("steps", (1, 2, 4, 8, 50))
def test_lcm_with_the_posterior_mean_follows_its_closed_form(mixture_2d, steps):
    """With the posterior mean instead, LCM is NOT a sampler of the data. For one Gaussian
    N(mu, U diag(lambda) U^T), D(x) = mu + a (x - mu) per eigen-direction, a = lambda / (lambda + sigma^2),
    so the mean stays mu and the variance follows, from c_0 = lambda + sigma_0^2,

        c <- a_i^2 c + sigma_{i+1}^2   (the last step, to sigma = 0, adds nothing).

    One step collapses to the mean (c ~ lambda^2 / sigma_max^2); many small steps drive c to the
    fixed point of c = (1 - sigma^2 / lambda)^2 c + sigma^2, i.e. lambda / 2. The sampler must match
    this prediction, and the prediction must be far from lambda."""
    gmm = mixture_2d
    one = GaussianMixture(torch.ones(1), gmm.means[:1], gmm.covs[:1])
    schedule = DiscreteSchedule.make("scaled_linear")
    sigmas = get_sigmas(schedule, steps, "trailing")
    lam = one.lam[0]  # (2,)
    c = lam + sigmas[0] ** 2
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        c = (lam / (lam + sigma**2)) ** 2 * c + sigma_next**2
    x = one.sample_noised(N_2D, float(sigmas[0]), torch.Generator().manual_seed(3))
    out = sample(one.denoise, x, sigmas, "lcm", generator=torch.Generator().manual_seed(4)).double()
    y = (out - one.means[0]) @ one.U[0]  # (n, 2) eigen coordinates
    # Monte-Carlo: relative std of a variance estimate sqrt(2/n) = 0.022; of the mean, sqrt(c/n)
    torch.testing.assert_close(y.var(0) / c, torch.ones(2, dtype=torch.float64), rtol=0, atol=0.1)
    assert (y.mean(0).abs() <= 5 * (c / N_2D).sqrt()).all()
    assert (c / lam <= 0.6).all(), f"predicted variance ratio {c / lam} should be far from 1"


# --------------------------------------------------------------------------------------------------
# Zero terminal SNR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,steps", [("euler", 200), ("ddim", 200), ("dpmpp_2m", 100)])
def test_zero_terminal_snr_v_prediction(mixture_2d, name, steps):
    """Lin et al. 2023: rescaled scaled_linear betas (alpha_bar_T = 0, clamped to 2^-24, so
    sigma_max = 4096: pure noise), a v-prediction network, trailing timesteps starting at T - 1.
    The last nonzero sigma of trailing spacing is large (t = round(T / steps) - 1), and the final
    jump x <- D(x, sigma_last) shrinks the variance along the thinnest direction by
    sigma_last^2 / lambda: 10% at 100 steps, 5% at 200 -- hence more steps than with Karras spacing."""
    out = run_sampler(mixture_2d, name, "v", "scaled_linear", steps, N_2D, spacing="trailing", zero_terminal_snr=True)
    assert_within(mixture_error(mixture_2d, out), TOL_2D, f"{name}/zero-terminal-SNR/{steps} steps")
