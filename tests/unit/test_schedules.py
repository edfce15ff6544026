"""Schedules and discretisations against closed forms and diffusers."""

import math

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from unfog.diffusion import DiscreteSchedule, get_sigmas, karras_sigmas, make_betas, rescale_zero_terminal_snr
from unfog.diffusion.schedules import timesteps_for

DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_match_diffusers(kind):
    ours = DiscreteSchedule.make(kind).alphas_cumprod
    theirs = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_NAMES[kind], beta_start=0.00085 if kind == "scaled_linear" else 1e-4,
                                     beta_end=0.012 if kind == "scaled_linear" else 0.02).alphas_cumprod
    # diffusers multiplies 1000 float32 factors; the float64 product agrees to float32 accumulation error.
    assert torch.allclose(ours.float(), theirs, rtol=2e-5, atol=1e-7)


def test_beta_endpoints():
    assert make_betas("linear")[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    b = make_betas("scaled_linear")
    assert b[[0, -1]].tolist() == pytest.approx([0.00085, 0.012])
    assert torch.allclose(b.sqrt().diff(), b.sqrt().diff()[0].expand(999), atol=1e-15)  # linear in sqrt space


def test_cosine_closed_form():
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    ab = DiscreteSchedule.make("cosine").alphas_cumprod
    betas = make_betas("cosine")
    assert betas.max() == pytest.approx(0.999)  # clipped at the end
    unclipped = (betas < 0.999).nonzero().max()
    for t in [0, 10, 500, int(unclipped)]:
        assert float(ab[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-10)


def test_zero_terminal_snr():
    betas = make_betas("scaled_linear")
    rescaled = rescale_zero_terminal_snr(betas)
    ab = torch.cumprod(1 - rescaled, 0)
    assert float(ab[-1]) == pytest.approx(0, abs=1e-12)
    assert float(ab[0]) == pytest.approx(float(1 - betas[0]), rel=1e-12)
    # diffusers' function run in float64, as ours is: 9e-16 apart. (In float32 its cumprod over 1000
    # steps rounds differently on different CPUs' kernels: 5.5e-6 on an AVX-512 machine.)
    assert torch.allclose(rescaled, diffusers_rescale(betas.clone()), rtol=0, atol=1e-12)
    sched = DiscreteSchedule.make("scaled_linear", zero_terminal_snr=True)
    assert sched.sigma_max == pytest.approx(4096.0)  # alpha_bar clamped to 2^-24, as diffusers' Euler does


def test_sigma_t_round_trip():
    s = DiscreteSchedule.make("scaled_linear")
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(s.t_to_sigma(t), s.sigmas)
    assert torch.allclose(s.sigma_to_t(s.sigmas), t, atol=1e-8)
    frac = torch.tensor([0.5, 10.25, 998.75], dtype=torch.float64)
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(frac)), frac, atol=1e-9)  # exact inverses
    assert float(s.sigma_to_t(torch.tensor(1e9))) == 999 and float(s.sigma_to_t(torch.tensor(1e-9))) == 0


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50])
def test_uniform_spacings_match_diffusers(spacing, steps):
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             timestep_spacing=spacing, steps_offset=1)
    sched.set_timesteps(steps)
    assert torch.allclose(timesteps_for(spacing, steps).float(), sched.timesteps)


def test_karras_and_exponential():
    s = karras_sigmas(10, 0.03, 14.6, rho=7)
    assert s[[0, -1]].tolist() == pytest.approx([14.6, 0.03])
    inv = s ** (1 / 7)
    assert torch.allclose(inv.diff(), inv.diff()[0].expand(9))  # evenly spaced in sigma^(1/rho)
    sched = DiscreteSchedule.make("scaled_linear")
    e = get_sigmas(sched, 10, "exponential")
    assert e[-1] == 0 and e[0] == pytest.approx(sched.sigma_max)
    assert torch.allclose(e[:-1].log().diff(), e[:-1].log().diff()[0].expand(9))


def test_sgm_uniform():
    sched = DiscreteSchedule.make("scaled_linear")
    s = get_sigmas(sched, 4, "sgm_uniform")
    t = sched.sigma_to_t(s[:-1])
    assert s[-1] == 0 and len(s) == 5
    assert torch.allclose(t, torch.tensor([999, 999 * 3 / 4, 999 / 2, 999 / 4], dtype=torch.float64), atol=1e-6)


def test_get_sigmas_shape_and_order():
    sched = DiscreteSchedule.make("linear")
    for spacing in ["leading", "linspace", "trailing", "karras", "exponential", "sgm_uniform"]:
        s = get_sigmas(sched, 12, spacing)
        assert s.shape == (13,) and s[-1] == 0 and bool((s.diff() < 0).all()), spacing


def test_bad_names_list_choices():
    with pytest.raises(ValueError, match="valid choices: leading, linspace, trailing, karras"):
        get_sigmas(DiscreteSchedule.make(), 10, "cosine")
    with pytest.raises(ValueError, match="valid choices: linear, scaled_linear, cosine"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="at least 1"):
        get_sigmas(DiscreteSchedule.make(), 0)


def test_full_chain_needs_trailing_or_linspace():
    sched = DiscreteSchedule.make("linear")
    with pytest.raises(ValueError, match="use spacing 'trailing' or 'linspace'"):
        get_sigmas(sched, 1000, "leading")
    for spacing in ("trailing", "linspace"):
        s = get_sigmas(sched, 1000, spacing)
        assert torch.allclose(s[:-1].flip(0), sched.sigmas)  # every training timestep, 999 .. 0
    with pytest.raises(ValueError, match="more than the model's 1000"):
        get_sigmas(sched, 1001, "trailing")
