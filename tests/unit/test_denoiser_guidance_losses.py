"""The denoiser wrapper, classifier-free guidance and the training losses."""

import math

import diffusers
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from unfog.diffusion import CFGDenoiser, Denoiser, DiscreteSchedule, network_target, truncation_sigma
from unfog.diffusion.losses import (
    LossConfig,
    diffusion_loss,
    draw_timesteps,
    min_snr_weight,
    offset_noise,
    q_sample,
    timestep_probabilities,
)

SCHED = DiscreteSchedule.make("scaled_linear")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_denoiser_recovers_x0_from_exact_network(prediction):
    """A network that outputs the exact target for a known (x0, noise) makes D return x0."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    sigma = SCHED.sigmas[t].float()
    x = x0 + sigma[:, None, None] * noise  # VE

    def net(x_vp, t_in):
        assert torch.allclose(t_in, t.float(), atol=1e-3)  # the wrapper hands the training timestep back
        assert torch.allclose(x_vp, x / (1 + sigma**2).sqrt()[:, None, None], rtol=1e-6)
        return network_target(x0, noise, sigma, prediction)

    assert torch.allclose(Denoiser(net, SCHED, prediction)(x, sigma), x0, atol=1e-5)


def test_v_target_matches_diffusers():
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    ours = network_target(x0, noise, SCHED.sigmas[t].float(), "v")
    assert torch.allclose(ours, sched.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.allclose(q_sample(x0, t, noise, SCHED), sched.add_noise(x0, noise, t), atol=1e-5)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="valid choices: eps, v, x0"):
        Denoiser(lambda x, t: x, SCHED, "epsilon")


def _toy_denoiser(x, sigma, y):
    expand = (-1,) + (1,) * (x.ndim - 1)
    return torch.tanh(x) * (1 + y.reshape(expand).float()) + 0.1 * sigma.reshape(expand)


def test_cfg_scale_endpoints_and_one_batched_call():
    calls = []

    def den(x, sigma, y):
        calls.append(x.shape[0])
        return _toy_denoiser(x, sigma, y)

    x, sigma = torch.randn(5, 3), torch.full((5,), 2.0)
    cond, uncond = {"y": torch.ones(5, dtype=torch.long)}, {"y": torch.zeros(5, dtype=torch.long)}
    d_cond, d_uncond = _toy_denoiser(x, sigma, cond["y"]), _toy_denoiser(x, sigma, uncond["y"])
    assert torch.allclose(CFGDenoiser(den, cond, uncond, 1.0)(x, sigma), d_cond)
    assert torch.allclose(CFGDenoiser(den, cond, uncond, 0.0)(x, sigma), d_uncond)
    assert torch.allclose(CFGDenoiser(den, cond, uncond, 7.5)(x, sigma), d_uncond + 7.5 * (d_cond - d_uncond))
    assert calls == [10, 10, 10]  # one call of twice the batch each time


def test_cfg_truncation_runs_the_conditional_pass_alone_below_its_sigma():
    calls = []

    def den(x, sigma, y):
        calls.append(x.shape[0])
        return _toy_denoiser(x, sigma, y)

    x = torch.randn(5, 3)
    cond, uncond = {"y": torch.ones(5, dtype=torch.long)}, {"y": torch.zeros(5, dtype=torch.long)}
    guided = CFGDenoiser(den, cond, uncond, 7.5, rescale=0.5, cond_only_below=1.0)
    for s in (0.5, 1.0):  # at and below: D(x, sigma | cond), one call of batch B
        sigma = torch.full((5,), s)
        assert torch.equal(guided(x, sigma), _toy_denoiser(x, sigma, cond["y"]))
    sigma = torch.full((5,), 1.5)
    assert torch.equal(guided(x, sigma), CFGDenoiser(den, cond, uncond, 7.5, rescale=0.5)(x, sigma))
    assert calls == [5, 5, 10, 10]


def test_truncation_sigma_is_that_of_the_first_unguided_step():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])  # 5 steps
    assert truncation_sigma(sigmas, 1.0) == -1.0  # every step guided
    assert truncation_sigma(sigmas, 0.99) == -1.0  # 4.95 steps guided, rounded up: all 5
    assert truncation_sigma(sigmas, 0.8) == 0.5  # steps 0-3 guided, step 4 not
    assert truncation_sigma(sigmas, 0.5) == 1.0  # ceil(2.5) = 3
    assert truncation_sigma(sigmas, 0.0) == 8.0  # no step guided
    assert truncation_sigma(torch.linspace(10, 0, 21), 0.8) == pytest.approx(2.0)  # 0.8 * 20 is step 16


def test_cfg_rescale_matches_diffusers():
    """diffusers rescales the guided eps; ours, in eps space, must give the same x0."""
    x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 3.0)
    cond, uncond = {"y": torch.ones(2, dtype=torch.long)}, {"y": torch.zeros(2, dtype=torch.long)}
    ours = CFGDenoiser(_toy_denoiser, cond, uncond, 7.0, rescale=0.7, rescale_space="eps")(x, sigma)
    eps = lambda d: (x - d) / sigma[:, None, None, None]
    e_c, e_u = eps(_toy_denoiser(x, sigma, cond["y"])), eps(_toy_denoiser(x, sigma, uncond["y"]))
    e_cfg = rescale_noise_cfg(e_u + 7.0 * (e_c - e_u), e_c, guidance_rescale=0.7)
    assert torch.allclose(ours, x - sigma[:, None, None, None] * e_cfg, atol=1e-5)


def test_cfg_bad_input():
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        CFGDenoiser(_toy_denoiser, {"y": 1}, {"y": 0}, -1.0)
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(_toy_denoiser, {"y": 1}, {"context": 0}, 2.0)


def test_min_snr_weights_closed_form():
    t = torch.tensor([0, 300, 999])
    s = 1 / SCHED.sigmas[t] ** 2
    assert torch.allclose(min_snr_weight(t, SCHED, "eps", 5.0), s.clamp(max=5) / s)
    assert torch.allclose(min_snr_weight(t, SCHED, "v", 5.0), s.clamp(max=5) / (s + 1))
    assert torch.allclose(min_snr_weight(t, SCHED, "x0", 5.0), s.clamp(max=5))
    assert float(min_snr_weight(torch.tensor([999]), SCHED, "eps", 5.0)) == pytest.approx(1.0)  # low SNR: unweighted


def test_timestep_bias_closed_form_and_draws():
    p = timestep_probabilities(1000, "later", 4.0, 0.25)
    assert p.sum().item() == pytest.approx(1.0)
    assert torch.equal(p[750:], torch.full((250,), 4 / 1750, dtype=torch.float64))
    assert torch.allclose(p[:750], torch.full((750,), 1 / 1750, dtype=torch.float64))
    early = timestep_probabilities(1000, "earlier", 3.0, 0.1)
    assert early[:100].sum().item() == pytest.approx(300 / 1200) and early[100:].unique().numel() == 1
    assert torch.equal(timestep_probabilities(1000), torch.full((1000,), 1e-3, dtype=torch.float64))

    n = 200_000
    t = draw_timesteps(n, SCHED, LossConfig(timestep_bias="later", timestep_bias_multiplier=4.0),
                       torch.Generator().manual_seed(0))
    share, expected = (t >= 750).double().mean().item(), 4 / 7
    assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / n)  # 5 standard errors
    per_bin = torch.bincount(t[t >= 750] - 750, minlength=250).double()  # flat inside the boosted range
    assert per_bin.std() / per_bin.mean() < 0.06 and t.min() >= 0 and t.max() <= 999
    # No bias: the same uniform draws as ever, so existing runs resume and replay unchanged.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(draw_timesteps(64, SCHED, LossConfig(), g1), torch.randint(0, 1000, (64,), generator=g2))


def test_timestep_bias_bad_values():
    with pytest.raises(ValueError, match="timestep bias 'late'; valid choices: none, later, earlier"):
        LossConfig(timestep_bias="late")
    with pytest.raises(ValueError, match="timestep_bias_multiplier must be > 0"):
        LossConfig(timestep_bias="later", timestep_bias_multiplier=0)
    with pytest.raises(ValueError, match=r"timestep_bias_portion must be in \(0, 1\)"):
        LossConfig(timestep_bias="later", timestep_bias_portion=1.0)


def test_offset_noise_statistics():
    n = offset_noise(torch.Size([4000, 3, 4, 4]), 0.1, torch.Generator().manual_seed(0))
    per_channel_mean = n.mean(dim=(2, 3))  # (B, C): N(0, 1/16) + 0.1 * N(0, 1)
    assert per_channel_mean.var().item() == pytest.approx(1 / 16 + 0.01, rel=0.1)
    assert torch.equal(offset_noise(torch.Size([2, 3]), 0.0, torch.Generator().manual_seed(0)),
                       torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_is_zero_for_the_exact_target(prediction):
    """A model that returns the exact target gets loss 0; the target is derived independently."""
    g_seed = 3
    x0 = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(9))
    # Replay the loss's own draws (t, then noise) to build the oracle model.
    g = torch.Generator().manual_seed(g_seed)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ab = SCHED.alphas_cumprod[t].float()[:, None, None, None]
    target = {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]

    def model(x_t, t_in):
        assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-6)
        return target

    loss = diffusion_loss(model, x0, SCHED, LossConfig(prediction), generator=torch.Generator().manual_seed(g_seed))
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    wrong = diffusion_loss(lambda x, t: target + 1, x0, SCHED, LossConfig(prediction),
                           generator=torch.Generator().manual_seed(g_seed))
    assert float(wrong) == pytest.approx(1.0, rel=1e-5)
