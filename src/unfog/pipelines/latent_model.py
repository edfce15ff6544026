"""unfog's own latent text-to-image models (``unfog train``, task "text2image"): one file.

The file is one safetensors file holding the three trained networks under prefixes
(``unet.`` or ``dit.``: the denoising network, ``models.backbone``; ``vae.``, ``text_encoder.``) and the tokenizer's kept CLIP ids
(``tokenizer.kept_ids``, see ``SubVocabTokenizer``); the metadata holds each network's config,
the noise schedule and prediction type, and the native image size. It loads as a
``StableDiffusion`` pipeline of the "sd1" family (one CLIP-style encoder whose last layer is
the context), so txt2img, img2img, inpainting, long prompts and emphasis all work on it. A model
trained with ``size_conditioning`` says so in ``info``; its pipeline builds SDXL's vector ``y``
from the encoder's pooled output and the call's sizes (``StableDiffusion(size_conditioning=True)``).
The pipeline is built by ``StableDiffusion.from_text2image`` from ``load_parts``: this module
does not import the pipeline, so the two do not import each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import io
from ..checkpoint.io import load_safetensors, read_metadata, save_safetensors
from ..diffusion import DiscreteSchedule
from ..models.clip_text import CLIPTextConfig, CLIPTextEncoder
from ..models.tokenizer import CLIPTokenizer, SubVocabTokenizer
from ..models.backbone import KINDS, Backbone, build, config_from_dict, kind_of
from ..models.vae import AutoencoderKL, VAEConfig

FORMAT = "unfog.text2image.v1"
VAE_FORMAT = "unfog.autoencoder.v1"
PARTS = ("unet", "vae", "text_encoder")


@dataclass(frozen=True)
class LatentModelInfo:
    image_size: int  # the side the model was trained at, its default
    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    prediction: str = "eps"
    size_conditioning: bool = False  # the U-Net takes SDXL's y (pooled text output + sizes)
    low_res: int | None = None  # a super-resolution model of images of this side (super_resolution.py)

    def make_schedule(self) -> DiscreteSchedule:
        return DiscreteSchedule.make(self.schedule, self.num_timesteps, self.beta_start, self.beta_end,
                                     zero_terminal_snr=self.zero_terminal_snr)


def is_text2image_model(path: str | Path) -> bool:
    return (read_metadata(path) or {}).get("format") == FORMAT


def recommended_settings(path: str | Path) -> dict[str, Any]:
    """The sampling settings a text-to-image model file recommends (its ``defaults`` metadata:
    sampler, steps, cfg_scale); for a cascade of such models (``cascade.py``), its base stage's,
    which the call's settings draw (the second stage keeps its own); {} for any other file."""
    meta = read_metadata(path) or {}
    base = meta.get("base")
    if isinstance(base, dict) and base.get("format") == FORMAT:  # a cascade file holds each stage's metadata
        return dict(base.get("defaults") or {})
    return io.recommended_settings(path, FORMAT)


def save_text2image(path: str | Path, unet: Backbone, vae: AutoencoderKL, text_encoder: CLIPTextEncoder,
                    tokenizer: SubVocabTokenizer, info: LatentModelInfo, extra: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write the model file (atomically). ``dtype`` is the stored precision of the weights.
    ``unet``: the denoising network, a U-Net or a DiT (its part is named by its kind)."""
    kind = kind_of(unet)
    tensors = {f"{name}.{k}": v.detach().to("cpu", dtype) for name, module in
               ((kind, unet), ("vae", vae), ("text_encoder", text_encoder)) for k, v in module.state_dict().items()}
    tensors["tokenizer.kept_ids"] = torch.tensor(tokenizer.kept_ids, dtype=torch.int64)
    config = asdict(replace(unet.config, gradient_checkpointing=False))
    meta = {"format": FORMAT, kind: config, "vae": asdict(vae.config),
            "text_encoder": asdict(text_encoder.config), "info": asdict(info), **(extra or {})}
    save_safetensors(path, tensors, meta)


def _part(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of module ``name`` in a model file, without their "name." prefix."""
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}


def load_parts(path: str | Path, dtype: torch.dtype = torch.float32):
    """(backbone, vae, text_encoder, tokenizer, info, metadata) of a text-to-image model file."""
    tensors, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an unfog text-to-image model (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return parts_from(tensors, meta, path, dtype)


def parts_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path,
               dtype: torch.dtype = torch.float32):
    """``load_parts`` of a model file's tensors and metadata (also one stage of a cascade file)."""
    kind = next((k for k in KINDS if k in meta), None)
    if kind is None:
        raise ValueError(f"{path} has no denoising network (metadata key {' or '.join(map(repr, KINDS))})")
    modules = {kind: build(config_from_dict(kind, meta[kind])), "vae": AutoencoderKL(VAEConfig(**meta["vae"])),
               "text_encoder": CLIPTextEncoder(CLIPTextConfig(**meta["text_encoder"]))}
    for name, module in modules.items():
        module.load_state_dict(_part(tensors, name), strict=True)
        module.to(dtype).eval()
    tokenizer = SubVocabTokenizer(CLIPTokenizer.from_bpe_file(), tensors["tokenizer.kept_ids"].tolist())
    return modules[kind], modules["vae"], modules["text_encoder"], tokenizer, LatentModelInfo(**meta["info"]), meta


def save_autoencoder(path: str | Path, vae: AutoencoderKL, extra: dict[str, Any] | None = None) -> None:
    """A trained autoencoder (stage 1): its weights and config, the scaling factor included."""
    save_safetensors(path, {k: v.detach().cpu() for k, v in vae.state_dict().items()},
                     {"format": VAE_FORMAT, "vae": asdict(vae.config), **(extra or {})})


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """An autoencoder file (stage 1), or the autoencoder inside a text-to-image model file (in
    float32, from the file's precision): fine-tuning the embedded model needs nothing else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder file not found: {path} (train one with a config whose task is "
                                "'autoencoder', e.g. `unfog train configs/shapes_vae.json`)")
    tensors, meta = load_safetensors(path)
    if meta.get("format") == FORMAT:
        tensors = {k: v.float() for k, v in _part(tensors, "vae").items()}
    elif meta.get("format") != VAE_FORMAT:
        raise ValueError(f"{path} is not an unfog autoencoder (metadata format {meta.get('format')!r}, "
                         f"expected {VAE_FORMAT!r}, or a text-to-image model file, {FORMAT!r})")
    vae = AutoencoderKL(VAEConfig(**meta["vae"]))
    vae.load_state_dict(tensors, strict=True)
    return vae.eval()
