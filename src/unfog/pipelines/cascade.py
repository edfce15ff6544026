"""A cascade in pixel space (GLIDE, Nichol et al. 2021; Imagen, Saharia et al. 2022; Ho et al.
2021, "Cascaded Diffusion Models"): a text-to-image base model draws a small image, a diffusion
super-resolution model conditioned on it and on the same prompt draws the large one.

Both stages are unfog text-to-image model files trained by task ``text2image`` in pixel space
(``text2image.vae_model: "pixel"``; the second with ``text2image.low_res`` equal to the base's
size). A cascade file holds the two under ``base.`` and ``sr.`` (each as its own file holds it:
the network, the text encoder and its vocabulary), their metadata under "base" and "sr", and the
settings of the second stage ("sr_settings": sampler, steps, cfg_scale, noise_augmentation). It
loads as the base's ``StableDiffusion`` with the second stage attached (``pipe.super_resolution``),
so every call, ``unfog generate --model cascade.safetensors`` included, draws through both:

    unfog cascade runs/pixel_base/model.safetensors runs/pixel_sr/model.safetensors -o cascade.safetensors
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint.io import load_safetensors, read_metadata, save_safetensors
from ..diffusion import resolve_sampler
from .latent_model import FORMAT as MODEL_FORMAT
from .latent_model import LatentModelInfo, parts_from

FORMAT = "unfog.cascade.v1"
STAGES = ("base", "sr")


@dataclass(frozen=True)
class StageSettings:
    """How the second stage draws (its steps are its own; the seed and prompt are the call's)."""

    sampler: str = "dpmpp_2m"
    steps: int = 20
    cfg_scale: float = 2.0
    noise_augmentation: float = 0.1  # the low-resolution image is noised to this fraction of the schedule

    def __post_init__(self):
        resolve_sampler(self.sampler)  # an unknown name lists the valid ones
        if self.steps < 1:
            raise ValueError(f"the second stage's steps must be >= 1, got {self.steps}")
        if self.cfg_scale < 0:
            raise ValueError(f"the second stage's guidance scale must be >= 0, got {self.cfg_scale}")
        if not 0 <= self.noise_augmentation < 1:
            raise ValueError(f"noise augmentation must be in [0, 1), got {self.noise_augmentation}")


def second_stage(pipe, prompts: list[str], negative_prompt, images: Tensor, batch_size: int, seed: int,
                 callback=None) -> Tensor:
    """The second stage of ``pipe``'s cascade on the first stage's ``images`` (B, 3, h, w): the same
    prompts (``batch_size`` images each, prompt-major) and seed, its own settings."""
    s = pipe.super_resolution_settings
    negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    expand = lambda texts: [t for t in texts for _ in range(batch_size)]  # noqa: E731
    return pipe.super_resolution(expand(prompts), expand(negative), low_res_image=images, steps=s.steps,
                                 sampler=s.sampler, cfg_scale=s.cfg_scale, noise_augmentation=s.noise_augmentation,
                                 seed=seed, output="tensor", callback=callback)


def is_cascade(path: str | Path) -> bool:
    return (read_metadata(path) or {}).get("format") == FORMAT


def save_cascade(path: str | Path, base: str | Path, sr: str | Path, settings: StageSettings = StageSettings(),
                 *, overwrite: bool = False) -> None:
    """One cascade file from a base model file and a super-resolution model file, checked to fit:
    both unfog text-to-image models, the base drawing from noise in pixel space, the second
    upsampling exactly the base's size."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    tensors, meta = {}, {"format": FORMAT, "sr_settings": asdict(settings)}
    infos = {}
    for stage, file in zip(STAGES, (base, sr)):
        weights, stage_meta = load_safetensors(file)
        if stage_meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{file} is not an unfog text-to-image model (the cascade's {stage} stage must be one)")
        tensors |= {f"{stage}.{k}": v for k, v in weights.items()}
        meta[stage] = stage_meta
        infos[stage] = LatentModelInfo(**stage_meta["info"])
    if infos["base"].low_res is not None:
        raise ValueError(f"{base} is a super-resolution model; the base stage draws from noise")
    if infos["sr"].low_res is None:
        raise ValueError(f"{sr} draws from noise; the second stage must be a super-resolution model "
                         "(trained with text2image.low_res)")
    if infos["sr"].low_res != infos["base"].image_size:
        raise ValueError(f"{sr} upsamples {infos['sr'].low_res} px images but {base} draws "
                         f"{infos['base'].image_size} px ones")
    save_safetensors(path, tensors, meta)


def load_cascade(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The base stage's ``StableDiffusion`` with the second stage attached (module docstring)."""
    from .stable_diffusion import StableDiffusion

    tensors, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an unfog cascade (metadata format {meta.get('format')!r})")
    missing = [stage for stage in STAGES if stage not in meta or not any(k.startswith(stage + ".") for k in tensors)]
    if missing:
        raise ValueError(f"{path} is a cascade file without its {' and '.join(missing)} stage "
                         f"(a cascade holds {' and '.join(STAGES)}; write it with `unfog cascade BASE SR -o FILE`)")
    pipes = {}
    for stage in STAGES:
        part = {k[len(stage) + 1:]: v for k, v in tensors.items() if k.startswith(stage + ".")}
        pipes[stage] = StableDiffusion.from_parts(parts_from(part, meta[stage], f"{path} ({stage})", dtype))
    base = pipes["base"].to(device)
    base.attach_super_resolution(pipes["sr"].to(device), StageSettings(**meta.get("sr_settings", {})))
    return base

