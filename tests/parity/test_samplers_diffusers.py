"""Sampler trajectories against diffusers' schedulers.

The same deterministic, non-linear model function and the same injected noise drive a diffusers
scheduler loop and the matching unfog sampler from the same starting point. diffusers' "VP"
schedulers (DDPM, DDIM, DPM-Solver, UniPC, LCM) hold x_vp = x / sqrt(1 + sigma^2); its "k" schedulers
(Euler, Heun, DPM2, LMS) hold the VE variable x itself, as unfog does. We compare the state at the
start of every step, mapped to the VE variable, and the final sample: relative error <= 1e-5.

Conventions that differ (see docs/samplers.md): diffusers' multistep solvers (DPMSolverMultistep,
UniPC, DPMSolverSinglestep, LCM) pick their own timesteps, so their sigmas are handed to our
sampler; for DDPM, DDIM and the k schedulers our own `get_sigmas` is used and checked to produce
the same timesteps.
"""

from __future__ import annotations

import inspect
import math

import diffusers
import pytest
import torch

from unfog.diffusion import ConsistencyBoundary, Denoiser, DiscreteSchedule, get_sigmas, karras_sigmas, sample

RTOL = 1e-5
SIGMA_RTOL = 2e-5  # float32 cumprod in diffusers vs float64 here
STEPS = 10
PRED_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction"}
SHAPE = (2, 3, 4, 4)


def model_fn(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed non-linear "network" of (x_vp, t), smooth in t so fractional timesteps are fine."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    mix = x.roll(1, dims=1)
    return 0.6 * torch.tanh(x) + 0.3 * x * torch.cos(t / 400) + 0.2 * torch.sin(2 * mix + t / 250) - 0.05


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def start_sample(sigma_max: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g) * math.sqrt(1 + sigma_max**2)  # VE variable


def run_diffusers(sched, x_ve: torch.Tensor, vp: bool, seed: int, **step_kwargs):
    """The usual diffusers denoising loop; returns the VE states at the start of each step."""
    sigma0 = float(sched.sigmas[0]) if hasattr(sched, "sigmas") else None
    sample_ = x_ve / math.sqrt(1 + sigma0**2) if vp else x_ve.clone()
    g = torch.Generator().manual_seed(seed)
    states, scales = [], []
    for t in sched.timesteps:
        first_order = getattr(sched, "state_in_first_order", True)
        model_in = sched.scale_model_input(sample_, t)
        if first_order:
            states.append(sample_.clone())
        out = model_fn(model_in, t)
        if "generator" in inspect.signature(sched.step).parameters:  # only the stochastic ones take it
            step_kwargs["generator"] = g
        sample_ = sched.step(out, t, sample_, **step_kwargs).prev_sample
    return states, sample_


def run_unfog(sampler, x_ve, sigmas, schedule, prediction, seed, denoiser=None, **options):
    den = denoiser or Denoiser(model_fn, schedule, prediction)
    states = []
    out = sample(den, x_ve, sigmas, sampler, generator=torch.Generator().manual_seed(seed),
                 callback=lambda info: states.append(info["x"].clone()), **options)
    return states, out


def to_ve(states, sigmas):
    return [s * math.sqrt(1 + float(sig) ** 2) for s, sig in zip(states, sigmas)]


def assert_trajectories(ours, theirs, out_ours, out_theirs):
    assert len(ours) == len(theirs), f"{len(ours)} steps vs diffusers' {len(theirs)}"
    errs = [rel_err(a, b) for a, b in zip(ours, theirs)]
    assert max(errs) <= RTOL, f"per-step relative errors {['%.1e' % e for e in errs]}"
    assert rel_err(out_ours, out_theirs) <= RTOL, f"final relative error {rel_err(out_ours, out_theirs):.2e}"


def make_scheduler(cls, prediction, spacing, **config):
    """A scheduler configured as Stable Diffusion's (scaled_linear 0.00085..0.012, steps_offset 1)."""
    if spacing is not None:
        config.update(timestep_spacing=spacing, steps_offset=1)
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               prediction_type=PRED_TO_DIFFUSERS[prediction], **config)


SCHEDULE = DiscreteSchedule.make("scaled_linear")
CASES = [(p, s) for p in ("eps", "v") for s in ("leading", "trailing")]


# --- k-diffusion-style schedulers: our own sigmas, VE states ---------------------------------------

K_SCHEDULERS = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "dpm_2": (diffusers.KDPM2DiscreteScheduler, {}),
    "dpm_2_ancestral": (diffusers.KDPM2AncestralDiscreteScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
}


@pytest.mark.parametrize("prediction,spacing", CASES)
@pytest.mark.parametrize("sampler", list(K_SCHEDULERS))
def test_k_schedulers(sampler, prediction, spacing):
    cls, config = K_SCHEDULERS[sampler]
    sched = make_scheduler(cls, prediction, spacing, **config)
    sched.set_timesteps(STEPS)
    sigmas = get_sigmas(SCHEDULE, STEPS, spacing)
    # Our spacing gives diffusers' sigmas (the interleaved second-order ones aside), up to the
    # float32 rounding of diffusers' alphas_cumprod (a cumulative product of 1000 float32 terms).
    theirs = torch.unique_consecutive(sched.sigmas)
    assert torch.allclose(sigmas.float(), theirs, rtol=SIGMA_RTOL, atol=0), (sigmas, theirs)
    x = start_sample(float(sigmas[0]))
    states_d, out_d = run_diffusers(sched, x, vp=False, seed=1)
    states_u, out_u = run_unfog(sampler, x, sigmas, SCHEDULE, prediction, seed=1)
    assert_trajectories(states_u, states_d, out_u, out_d)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_karras(prediction):
    sched = make_scheduler(diffusers.EulerDiscreteScheduler, prediction, "leading", use_karras_sigmas=True)
    sched.set_timesteps(STEPS)
    # diffusers takes the Karras range from the interpolated leading sigmas, not the model's range.
    lo, hi = get_sigmas(SCHEDULE, STEPS, "leading")[[-2, 0]].tolist()
    sigmas = torch.cat([karras_sigmas(STEPS, lo, hi), torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(sigmas.float(), sched.sigmas, rtol=SIGMA_RTOL)
    x = start_sample(hi)
    states_d, out_d = run_diffusers(sched, x, vp=False, seed=2)
    states_u, out_u = run_unfog("euler", x, sigmas, SCHEDULE, prediction, seed=2)
    assert_trajectories(states_u, states_d, out_u, out_d)


# --- DDPM and DDIM: our own sigmas, VP states --------------------------------------------------------

@pytest.mark.parametrize("prediction,spacing", CASES)
@pytest.mark.parametrize("sampler,eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 1.0), ("ddim", 0.5)])
def test_ddpm_ddim(sampler, eta, prediction, spacing):
    if sampler == "ddpm":
        sched = make_scheduler(diffusers.DDPMScheduler, prediction, spacing, clip_sample=False)
        step_kwargs, options = {}, {}
    else:
        sched = make_scheduler(diffusers.DDIMScheduler, prediction, spacing, clip_sample=False, set_alpha_to_one=True)
        step_kwargs, options = {"eta": eta}, {"eta": eta}
    sched.set_timesteps(STEPS)
    sigmas = get_sigmas(SCHEDULE, STEPS, spacing)
    assert torch.equal(SCHEDULE.sigma_to_t(sigmas[:-1]).round().long(), sched.timesteps.long())
    x = start_sample(float(sigmas[0]))
    sched.sigmas = sigmas  # so run_diffusers can map its start to the VP variable
    states_d, out_d = run_diffusers(sched, x, vp=True, seed=3, **step_kwargs)
    states_u, out_u = run_unfog(sampler, x, sigmas, SCHEDULE, prediction, seed=3, **options)
    assert_trajectories(states_u, to_ve(states_d, sigmas), out_u, out_d)


# --- multistep / singlestep solvers: diffusers' sigmas, VP states ---------------------------------

def vp_case(sched, sampler, prediction, seed, denoiser=None, steps=STEPS, **options):
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()
    x = start_sample(float(sigmas[0]))
    states_d, out_d = run_diffusers(sched, x, vp=True, seed=seed)
    states_u, out_u = run_unfog(sampler, x, sigmas, SCHEDULE, prediction, seed, denoiser=denoiser, **options)
    out_d = out_d * math.sqrt(1 + float(sigmas[-1]) ** 2)  # VP -> VE (a no-op when the last sigma is 0)
    assert_trajectories(states_u, to_ve(states_d, sigmas), out_u, out_d)


DPM_VARIANTS = {
    "2M": ("dpmpp_2m", dict(solver_order=2), {}),
    "2M heun": ("dpmpp_2m", dict(solver_order=2, solver_type="heun"), {"solver_type": "heun"}),
    "2M SDE": ("dpmpp_2m_sde", dict(solver_order=2, algorithm_type="sde-dpmsolver++"), {}),
    # diffusers' 3M warms up with its configured 2nd-order step; ours (k-diffusion's) is the phi_2 form.
    # Below 15 steps diffusers also drops to 2nd order on the second-to-last step: compare at 16.
    "3M": ("dpmpp_3m_sde", dict(solver_order=3, solver_type="heun"), {"eta": 0.0}),
}


@pytest.mark.parametrize("prediction,spacing", CASES)
@pytest.mark.parametrize("variant", list(DPM_VARIANTS))
def test_dpm_solver_multistep(variant, prediction, spacing):
    sampler, config, options = DPM_VARIANTS[variant]
    sched = make_scheduler(diffusers.DPMSolverMultistepScheduler, prediction, spacing, final_sigmas_type="zero", **config)
    vp_case(sched, sampler, prediction, seed=4, steps=16 if variant == "3M" else STEPS, **options)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_multistep_karras(prediction):
    sched = make_scheduler(diffusers.DPMSolverMultistepScheduler, prediction, "leading",
                           use_karras_sigmas=True, final_sigmas_type="zero")
    # diffusers rounds the Karras timesteps to integers before calling the model.
    den = Denoiser(model_fn, SCHEDULE, prediction, round_timesteps=True)
    vp_case(sched, "dpmpp_2m", prediction, seed=5, denoiser=den)
    sched.set_timesteps(STEPS)
    ours = karras_sigmas(STEPS, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    assert torch.allclose(ours.float(), sched.sigmas[:-1], rtol=SIGMA_RTOL)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_singlestep(prediction):
    # DPMSolverSinglestepScheduler has one fixed spacing of its own (linspace over n + 1 points).
    sched = make_scheduler(diffusers.DPMSolverSinglestepScheduler, prediction, None, solver_order=2,
                           final_sigmas_type="zero")
    vp_case(sched, "dpmpp_2s", prediction, seed=6)


@pytest.mark.parametrize("prediction,spacing", CASES)
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc(order, variant, prediction, spacing):
    # diffusers' bh1 returns NaN on a last step to sigma = 0 (B(h) = h is infinite there), so bh1 is
    # compared on a schedule that ends at sigma_min; unfog ends either way with a first-order step.
    final = "zero" if variant == "bh2" else "sigma_min"
    sched = make_scheduler(diffusers.UniPCMultistepScheduler, prediction, spacing, solver_order=order,
                           solver_type=variant, final_sigmas_type=final)
    vp_case(sched, "unipc", prediction, seed=7, order=order, variant=variant)


@pytest.mark.parametrize("prediction,spacing", CASES)
def test_lcm(prediction, spacing):
    sched = make_scheduler(diffusers.LCMScheduler, prediction, spacing, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(4)
    ts = sched.timesteps.long()
    sigmas = torch.cat([SCHEDULE.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    sched.sigmas = sigmas
    x = start_sample(float(sigmas[0]))
    states_d, out_d = run_diffusers(sched, x, vp=True, seed=8)
    den = ConsistencyBoundary(Denoiser(model_fn, SCHEDULE, prediction))
    states_u, out_u = run_unfog("lcm", x, sigmas, SCHEDULE, prediction, seed=8, denoiser=den)
    assert_trajectories(states_u, to_ve(states_d, sigmas), out_u, out_d)
