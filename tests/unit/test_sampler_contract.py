"""The contract every registered sampler keeps (shapes, purity, determinism, the end at sigma 0)."""

import pytest
import torch

from unfog.diffusion import SAMPLERS, DiscreteSchedule, get_sigmas, resolve_sampler, sample, valid_names

SCHED = DiscreteSchedule.make("scaled_linear")
SIGMAS = get_sigmas(SCHED, 8, "karras")
STOCHASTIC = {"ddpm", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "lcm"}


def toy_denoiser(x, sigma, scale=None):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    out = x / (1 + s**2) + 0.3 * torch.tanh(x.roll(1, -1))
    return out * scale if scale is not None else out


def run(name, x, seed=0, **kw):
    return sample(toy_denoiser, x, SIGMAS, name, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
class TestSamplerContract:
    def test_shape_dtype_finite(self, name):
        x = torch.randn(3, 2, 5, 5) * float(SIGMAS[0])
        out = run(name, x)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()

    def test_does_not_modify_input(self, name):
        x = torch.randn(2, 4) * float(SIGMAS[0])
        before = x.clone()
        run(name, x)
        assert torch.equal(x, before)

    def test_same_seed_same_result(self, name):
        x = torch.randn(2, 4) * float(SIGMAS[0])
        assert torch.equal(run(name, x, seed=5), run(name, x, seed=5))
        if name in STOCHASTIC:
            assert not torch.equal(run(name, x, seed=5), run(name, x, seed=6))
        else:
            assert torch.equal(run(name, x, seed=5), run(name, x, seed=6))

    def test_visits_every_sigma_and_ends_at_zero(self, name):
        seen = []
        run(name, torch.randn(2, 4) * float(SIGMAS[0]), callback=lambda info: seen.append(info))
        assert [i["i"] for i in seen] == list(range(len(SIGMAS) - 1))
        assert seen[-1]["sigma_next"] == 0
        assert all(i["denoised"].shape == (2, 4) for i in seen)

    def test_extra_args_reach_the_denoiser(self, name):
        x = torch.randn(2, 4) * float(SIGMAS[0])
        a = run(name, x, extra_args={"scale": torch.tensor(0.5)})
        assert not torch.allclose(a, run(name, x))

    def test_single_step(self, name):
        out = sample(toy_denoiser, torch.ones(1, 3) * 14.6, torch.tensor([14.6, 0.0]), name,
                     generator=torch.Generator().manual_seed(0))
        # One step to sigma 0 returns the denoised estimate itself for every sampler.
        expected = toy_denoiser(torch.ones(1, 3) * 14.6, torch.tensor([14.6]))
        assert torch.allclose(out, expected, atol=1e-5)


def test_bad_sigmas():
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(toy_denoiser, torch.zeros(1, 2), torch.tensor([1.0, 2.0, 0.0]), "euler")
    with pytest.raises(ValueError, match="at least two"):
        sample(toy_denoiser, torch.zeros(1, 2), torch.tensor([1.0]), "euler")


@pytest.mark.parametrize("alias,name,spacing", [
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("Euler a", "euler_ancestral", None), ("euler", "euler", None),
    ("DPM++ SDE Karras", "dpmpp_sde", "karras"), ("DPM2 a", "dpm_2_ancestral", None), ("LMS Karras", "lms", "karras"),
    ("dpmpp_2m_sde_karras", "dpmpp_2m_sde", "karras"), ("DPM++ 3M SDE Exponential", "dpmpp_3m_sde", "exponential"),
    ("uni_pc_bh2", "unipc", None), ("UniPC", "unipc", None), ("DDIM", "ddim", None), ("euler SGM Uniform", "euler", "sgm_uniform"),
])
def test_aliases(alias, name, spacing):
    choice = resolve_sampler(alias)
    assert (choice.name, choice.spacing) == (name, spacing)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as err:
        resolve_sampler("dpm_fast")
    for name in SAMPLERS:
        assert name in str(err.value)
    assert set(SAMPLERS) <= set(valid_names())
