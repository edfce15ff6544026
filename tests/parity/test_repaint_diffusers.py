"""RePaint (``diffusion.repaint``) against diffusers' ``RePaintScheduler``, driven the way its
``RePaintPipeline`` drives it (``step`` on the way down, ``undo_step`` on each jump up), by the same
deterministic noise model and the same generator: the jump schedules are equal, and the
trajectories agree for several (jump_length, jump_n_sample) and eta: within 1e-8 in float64, 1e-4 in
float32 (where diffusers rounds its coefficients to float32; see the test)."""

from __future__ import annotations

import pytest
import torch
from diffusers import RePaintScheduler

from unfog.diffusion import Denoiser, DiscreteSchedule
from unfog.diffusion.repaint import repaint_timesteps, sample_repaint


def eps_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a network: eps from the variance-preserving x_t and t."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return 0.3 * torch.tanh(x) * torch.cos(t / 500) + 0.05 * x.mean(dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(50, 10, 10), (20, 5, 3), (12, 1, 4), (30, 3, 1)])
def test_jump_schedule_equals_diffusers(steps, jump_length, jump_n_sample):
    theirs = RePaintScheduler(num_train_timesteps=1000)
    theirs.set_timesteps(steps, jump_length, jump_n_sample)
    assert repaint_timesteps(steps, jump_length, jump_n_sample) == theirs.timesteps.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps, jump_length, jump_n_sample, eta", [(20, 5, 3, 1.0), (12, 2, 2, 0.0), (25, 4, 5, 0.5)])
def test_trajectory_equals_diffusers(steps, jump_length, jump_n_sample, eta, dtype):
    """In float64 both sides agree within 1e-8 (2e-9 measured: the model sees a timestep that unfog
    recovers from sigma). In float32 diffusers rounds its
    coefficients to float32 (sqrt(1 - beta) once per train timestep of every jump, its
    alphas_cumprod a float32 product of 1000 factors): 1e-5 to 4e-5 apart, so 1e-4 there."""
    scheduler = RePaintScheduler(num_train_timesteps=1000, beta_schedule="linear", eta=eta, clip_sample=False)
    scheduler.set_timesteps(steps, jump_length, jump_n_sample)
    if dtype == torch.float64:
        scheduler.betas = scheduler.betas.double()
        scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas, 0)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)
    known = torch.rand(2, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1
    keep = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).to(dtype)

    image, last, generator = start.clone(), scheduler.timesteps[0] + 1, torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        if t < last:
            image = scheduler.step(eps_model(image, t), t, image, known, keep, generator).prev_sample
        else:
            image = scheduler.undo_step(image, last, generator)
        last = t

    schedule = DiscreteSchedule.from_betas(scheduler.betas)
    denoiser = Denoiser(eps_model, schedule, "eps")  # D(x, sigma) of the same eps network
    ours = sample_repaint(denoiser, start.clone(), schedule, known, keep, steps=steps, jump_length=jump_length,
                          jump_n_sample=jump_n_sample, eta=eta, generator=torch.Generator().manual_seed(1))
    err = ((ours - image).norm() / image.norm()).item()
    print(f"({jump_length}, {jump_n_sample}), eta {eta}: relative error {err:.2e}")
    assert err < (1e-8 if dtype == torch.float64 else 1e-4)
    assert torch.allclose(ours * keep, known * keep, atol=1e-4)  # x_0 keeps the known region
    plain = sample_repaint(denoiser, start.clone(), schedule, known, keep, steps=steps, jump_length=jump_length,
                           jump_n_sample=1, eta=eta, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(plain, ours, atol=1e-3) or jump_n_sample == 1  # the jumps change the result


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"jump length 10 must be below the 10 steps"):
        repaint_timesteps(10, 10, 2)
    with pytest.raises(ValueError, match=r"jump length and jump count must be >= 1, got \(0, 3\)"):
        repaint_timesteps(10, 0, 3)
