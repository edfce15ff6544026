"""Samplers by name: unfog's own names, and the names people know from A1111 and ComfyUI.

    resolve_sampler("DPM++ 2M Karras")  ->  SamplerChoice("dpmpp_2m", spacing="karras")
    resolve_sampler("Euler a")          ->  SamplerChoice("euler_ancestral")
    resolve_sampler("uni_pc_bh2")       ->  SamplerChoice("unipc", options={"variant": "bh2"})
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from . import dpm_solvers as dpm
from . import samplers as sm

SamplerFn = Callable[..., Tensor]

SAMPLERS: dict[str, SamplerFn] = {
    "ddpm": sm.sample_ddpm,
    "ddim": sm.sample_ddim,
    "euler": sm.sample_euler,
    "euler_ancestral": sm.sample_euler_ancestral,
    "heun": sm.sample_heun,
    "dpm_2": sm.sample_dpm_2,
    "dpm_2_ancestral": sm.sample_dpm_2_ancestral,
    "lms": sm.sample_lms,
    "dpmpp_2s_ancestral": dpm.sample_dpmpp_2s_ancestral,
    "dpmpp_2s": dpm.sample_dpmpp_2s,
    "dpmpp_2m": dpm.sample_dpmpp_2m,
    "dpmpp_sde": dpm.sample_dpmpp_sde,
    "dpmpp_2m_sde": dpm.sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": dpm.sample_dpmpp_3m_sde,
    "unipc": dpm.sample_unipc,
    "lcm": sm.sample_lcm,
}

# Display names of A1111 (and the k-diffusion / ComfyUI spellings), without the schedule suffix.
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler a": ("euler_ancestral", {}),
    "k_euler_a": ("euler_ancestral", {}),
    "k_euler": ("euler", {}),
    "dpm2": ("dpm_2", {}),
    "dpm2 a": ("dpm_2_ancestral", {}),
    "dpm++ 2s a": ("dpmpp_2s_ancestral", {}),
    "dpm++ 2s": ("dpmpp_2s", {}),
    "dpm++ 2m": ("dpmpp_2m", {}),
    "dpm++ sde": ("dpmpp_sde", {}),
    "dpm++ 2m sde": ("dpmpp_2m_sde", {}),
    "dpm++ 2m sde heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpm++ 3m sde": ("dpmpp_3m_sde", {}),
    "uni_pc": ("unipc", {"variant": "bh1"}),  # ComfyUI: uni_pc is B(h) = h, uni_pc_bh2 the other
    "uni_pc_bh2": ("unipc", {"variant": "bh2"}),
    "ddpm": ("ddpm", {}),
}
_SUFFIXES = {"karras": "karras", "exponential": "exponential", "sgm uniform": "sgm_uniform"}


@dataclass(frozen=True)
class SamplerChoice:
    name: str
    spacing: str | None = None  # a spacing the name asks for, e.g. "karras" in "DPM++ 2M Karras"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fn(self) -> SamplerFn:
        return SAMPLERS[self.name]


def valid_names() -> list[str]:
    return sorted(SAMPLERS) + sorted(k for k in _ALIASES if k not in SAMPLERS)


def resolve_sampler(name: str) -> SamplerChoice:
    """Map a sampler name (ours, A1111's or ComfyUI's; case-insensitive, with an optional
    " Karras" / " Exponential" / " SGM Uniform" suffix) to the function, spacing and options."""
    key = re.sub(r"\s+", " ", name.strip().lower())
    spacing = None
    for suffix, value in _SUFFIXES.items():
        for sep in (" ", "_"):
            if key.endswith(sep + suffix):
                key, spacing = key[: -len(sep + suffix)], value
    if key in SAMPLERS:
        return SamplerChoice(key, spacing)
    if key in _ALIASES:
        fn_name, options = _ALIASES[key]
        return SamplerChoice(fn_name, spacing, dict(options))
    raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(valid_names())} "
                     "(A1111 names such as 'DPM++ 2M Karras' and 'Euler a' work too)")


def sample(denoiser, x: Tensor, sigmas: Tensor, sampler: str = "euler", **kwargs) -> Tensor:
    """Run the named sampler; ``kwargs`` are the common arguments plus the sampler's options."""
    choice = resolve_sampler(sampler)
    return choice.fn(denoiser, x, sigmas, **{**choice.options, **kwargs})
