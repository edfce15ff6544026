"""The diffusion core: pure maths over tensors, importing only torch (and numpy)."""

from .denoiser import PREDICTIONS, ConsistencyBoundary, Denoiser, network_target, scalings
from .guidance import CFGDenoiser, truncation_sigma
from .inpainting import InpaintDenoiser
from .registry import SAMPLERS, SamplerChoice, resolve_sampler, sample, valid_names
from .schedules import (
    BETA_SCHEDULES,
    SPACINGS,
    DiscreteSchedule,
    get_sigmas,
    karras_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
)

__all__ = [
    "BETA_SCHEDULES", "CFGDenoiser", "ConsistencyBoundary", "Denoiser", "DiscreteSchedule", "InpaintDenoiser",
    "PREDICTIONS", "SAMPLERS", "SPACINGS", "SamplerChoice", "get_sigmas", "karras_sigmas", "make_betas", "network_target",
    "rescale_zero_terminal_snr", "resolve_sampler", "sample", "scalings", "truncation_sigma", "valid_names",
]
