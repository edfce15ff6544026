"""Which model a single-file checkpoint holds, from the names and shapes of its tensors alone.

A full checkpoint keeps each component under a prefix (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.``, ``conditioner.embedders.N.``); the U-Net tells
the families apart through a few sentinel shapes::

    family         input_blocks.0.0.weight   attn2.to_k.weight   proj_in   label_emb.0.0.weight
    SD15           (320, 4, 3, 3)            (320, 768)          1x1 conv  -
    SD15_INPAINT   (320, 9, 3, 3)            (320, 768)          1x1 conv  -
    SD2            (320, 4, 3, 3)            (320, 1024)         Linear    -
    SD2_INPAINT    (320, 9, 3, 3)            (320, 1024)         Linear    -
    SDXL_BASE      (320, 4, 3, 3)            (640, 2048)         Linear    (1280, 2816)
    SDXL_REFINER   (384, 4, 3, 3)            (768, 1280)         Linear    (1536, 2560)

A file with the U-Net alone (``input_blocks.*`` at the top level) or the VAE alone
(``encoder.*`` / ``decoder.*``) is recognised too; its family has just that component.

What the weights cannot say. SD 2.x released eps-prediction models (512-base, 512-inpainting)
and v-prediction models (768-v) with identical tensors, so the prediction type is a default of
the family: "v" for SD2 (the 768-v models, SD 2.0-v and 2.1-v), "eps" for SD2_INPAINT and every
other family; pass ``prediction=`` to the loader for an SD2 512-base file. Likewise a bare SD
VAE and a bare SDXL VAE share one layout: the detected family is "VAE" (scaling factor
0.18215); name "SDXL_VAE" for the SDXL one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from unfog.diffusion.denoiser import Prediction
from unfog.diffusion.schedules import BetaSchedule, Spacing
from unfog.models.clip_text import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, CLIPTextConfig
from unfog.models.presets import SD2, SD2_INPAINT, SD15, SD15_INPAINT, SDXL_BASE, SDXL_REFINER
from unfog.models.unet import UNetConfig
from unfog.models.vae import SD_VAE, SDXL_VAE, VAEConfig

Component = Literal["unet", "vae", "text_encoder", "text_encoder_2"]
COMPONENTS: tuple[Component, ...] = get_args(Component)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# The key that shows a component stored alone, without a prefix.
BARE_SENTINELS: dict[Component, str] = {"unet": "input_blocks.0.0.weight", "vae": "encoder.conv_in.weight"}


@dataclass(frozen=True)
class SchedulerConfig:
    """The discrete noise schedule a model was trained with and its usual inference spacing
    (see ``unfog.diffusion.schedules``). Single files do not store it; every official Stable
    Diffusion model uses the default here (diffusers folders say so in ``scheduler/``)."""

    beta_schedule: BetaSchedule = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000
    spacing: Spacing = "leading"
    steps_offset: int = 1
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class Family:
    """A model family: the config of each component it has, where each sits in a single file,
    and the defaults the weights cannot tell (prediction type, noise schedule).

    prefixes: per component, the prefixes it may have in a single file, most usual first
        (SD 2.x files made with the newer ``sgm`` code put the text encoder under
        ``conditioner.embedders.0.``). ``resolve_family`` narrows them to the one a file uses.
    prediction: what the U-Net predicts (None without a U-Net); see the module docstring.
    """

    name: str
    prediction: Prediction | None = None
    unet: UNetConfig | None = None
    vae: VAEConfig | None = None
    text_encoder: CLIPTextConfig | None = None
    text_encoder_2: CLIPTextConfig | None = None
    prefixes: tuple[tuple[Component, tuple[str, ...]], ...] = ()
    scheduler: SchedulerConfig = SchedulerConfig()

    @property
    def components(self) -> tuple[Component, ...]:
        """The components this family has, in the order of ``COMPONENTS``."""
        return tuple(c for c in COMPONENTS if getattr(self, c) is not None)

    def prefix(self, component: Component) -> str:
        """Where ``component`` sits in a file of this (resolved) family ("" = top level)."""
        return dict(self.prefixes)[component][0]

    def restricted(self, found: Mapping[Component, str]) -> Family:
        """This family with only the components in ``found``, each at the prefix given there."""
        dropped = {c: None for c in COMPONENTS if c not in found}
        return replace(self, **dropped, prefixes=tuple((c, (found[c],)) for c in self.components if c in found))


def _full(name, prediction, unet, vae, text: Sequence[tuple[Component, CLIPTextConfig, tuple[str, ...]]]):
    encoders = {component: config for component, config, _ in text}
    prefixes = (("unet", (UNET_PREFIX,)), ("vae", (VAE_PREFIX,)), *((c, p) for c, _, p in text))
    return Family(name, prediction, unet, vae, prefixes=prefixes, **encoders)


# Text encoders and their prefixes (older LDM code first, then sgm's).
_CLIP_L = ("text_encoder", CLIP_L, ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."))
_OPENCLIP_H = ("text_encoder", OPENCLIP_H, ("cond_stage_model.model.", "conditioner.embedders.0.model."))
_XL_CLIP_L = ("text_encoder", CLIP_L, ("conditioner.embedders.0.transformer.",))
_XL_BIGG = ("text_encoder_2", OPENCLIP_BIGG, ("conditioner.embedders.1.model.",))
_REFINER_BIGG = ("text_encoder_2", OPENCLIP_BIGG, ("conditioner.embedders.0.model.",))

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _full("SD15", "eps", SD15, SD_VAE, [_CLIP_L]),
        _full("SD15_INPAINT", "eps", SD15_INPAINT, SD_VAE, [_CLIP_L]),
        _full("SD2", "v", SD2, SD_VAE, [_OPENCLIP_H]),
        _full("SD2_INPAINT", "eps", SD2_INPAINT, SD_VAE, [_OPENCLIP_H]),
        _full("SDXL_BASE", "eps", SDXL_BASE, SDXL_VAE, [_XL_CLIP_L, _XL_BIGG]),
        _full("SDXL_REFINER", "eps", SDXL_REFINER, SDXL_VAE, [_REFINER_BIGG]),
        Family("VAE", vae=SD_VAE, prefixes=(("vae", (VAE_PREFIX,)),)),
        Family("SDXL_VAE", vae=SDXL_VAE, prefixes=(("vae", (VAE_PREFIX,)),)),
    )
}


def get_family(name: str) -> Family:
    """The family called ``name`` (case-insensitive), e.g. ``get_family("sdxl_base")``."""
    try:
        return FAMILIES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; valid names: {', '.join(FAMILIES)}") from None


# ---------------------------------------------------------------- the U-Net's signature
Signature = tuple[int, int, int | None, bool, int | None]
SIGNATURE_FIELDS = "model_channels, in_channels, context_dim, linear projections, label_emb input width"
# Input-channel counts of official U-Nets that we recognise but do not support.
_UNSUPPORTED_INPUTS = {8: "InstructPix2Pix (8 input channels)", 5: "SD 2 depth-to-image (5 input channels)"}


def config_signature(cfg: UNetConfig) -> Signature:
    return (cfg.model_channels, cfg.in_channels, cfg.context_dim, cfg.use_linear_projection, cfg.adm_in_channels)


def unet_signature(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> Signature:
    """The sentinel shapes of the U-Net stored under ``prefix`` (see the module docstring)."""
    model_channels, in_channels = shapes[prefix + "input_blocks.0.0.weight"][:2]
    to_k = sorted(k for k in shapes if k.startswith(prefix) and k.endswith(".attn2.to_k.weight"))
    proj_in = sorted(k for k in shapes if k.startswith(prefix) and k.endswith(".proj_in.weight"))
    context_dim = shapes[to_k[0]][1] if to_k else None
    linear = bool(proj_in) and len(shapes[proj_in[0]]) == 2
    label = shapes.get(prefix + "label_emb.0.0.weight")
    return (model_channels, in_channels, context_dim, linear, label[1] if label else None)


def _unet_family(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> Family:
    signature = unet_signature(shapes, prefix)
    for family in FAMILIES.values():
        if family.unet is not None and config_signature(family.unet) == signature:
            return family
    known = "; ".join(f"{f.name} {config_signature(f.unet)}" for f in FAMILIES.values() if f.unet)
    hint = _UNSUPPORTED_INPUTS.get(signature[1])
    raise ValueError(
        f"the U-Net under {prefix or 'the top level'!r} has ({SIGNATURE_FIELDS}) = {signature}, "
        f"which matches no supported family" + (f"; it looks like {hint}, which unfog does not support" if hint else "")
        + f". Supported: {known}.\n{describe_keys(shapes)}"
    )


# ---------------------------------------------------------------- detection
def _shapes(keys_and_shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape if isinstance(v, torch.Tensor) else v) for k, v in keys_and_shapes.items()}


def detect_family(keys_and_shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> Family:
    """The family of a single-file checkpoint, from ``{name: shape}`` (or a state dict), narrowed
    to the components the file holds and the prefixes it uses (see ``resolve_family``).

    Raises ValueError for a layout it does not know, describing the keys it found.
    """
    shapes = _shapes(keys_and_shapes)
    if UNET_PREFIX + "input_blocks.0.0.weight" in shapes:
        return resolve_family(_unet_family(shapes, UNET_PREFIX), shapes)
    if BARE_SENTINELS["unet"] in shapes:
        return resolve_family(_unet_family(shapes, ""), shapes)
    if VAE_PREFIX + BARE_SENTINELS["vae"] in shapes or BARE_SENTINELS["vae"] in shapes:
        return resolve_family(FAMILIES["VAE"], shapes)
    raise ValueError(f"not a Stable Diffusion checkpoint layout that unfog knows.\n{describe_keys(shapes)}")


def resolve_family(family: Family, keys: Iterable[str]) -> Family:
    """``family`` narrowed to the components present in ``keys``, each with the prefix used there.

    A component is present when some key starts with one of its prefixes; a file holding one
    component at the top level (a bare U-Net or VAE) is recognised by ``BARE_SENTINELS``.
    """
    keys = list(keys)
    found: dict[Component, str] = {}
    for component, prefixes in family.prefixes:
        present = [p for p in prefixes if any(k.startswith(p) for k in keys)]
        if present:
            found[component] = present[0]
    if not found:
        found = {c: "" for c, key in BARE_SENTINELS.items() if c in family.components and key in keys}
    if not found:
        expected = ", ".join(p for _, prefixes in family.prefixes for p in prefixes)
        raise ValueError(
            f"no component of {family.name} in this file (expected keys under {expected}, or a bare "
            f"U-Net / VAE).\n{describe_keys(dict.fromkeys(keys))}"
        )
    fitted = {
        c: _fit_text_encoder(getattr(family, c), [k[len(p):] for k in keys if k.startswith(p)])
        for c, p in found.items()
        if c in ("text_encoder", "text_encoder_2")
    }
    return replace(family.restricted(found), **fitted)


_TEXT_LAYER = re.compile(r"^(?:transformer\.resblocks|(?:text_model\.)?encoder\.layers)\.(\d+)\.")


def _fit_text_encoder(config: CLIPTextConfig, keys: list[str]) -> CLIPTextConfig:
    """The preset's text encoder with the layer count of the file, and without the projection if
    the file has none: some fine-tunes drop what SD does not use (Waifu Diffusion 1.5 ships a
    23-layer ViT-H without ``text_projection``). A file with fewer layers than the preset keeps
    the preset's depth as ``trained_layers``, which "CLIP skip" counts from."""
    layers = {int(m.group(1)) for k in keys if (m := _TEXT_LAYER.match(k))}
    projection = any(k in ("text_projection", "text_projection.weight") for k in keys)
    kept = max(layers) + 1 if layers else config.layers
    return replace(
        config,
        layers=kept,
        trained_layers=config.depth if kept < config.depth else None,
        projection_dim=config.projection_dim if projection else None,
    )


def with_trained_depth(config: CLIPTextConfig) -> CLIPTextConfig:
    """A text encoder config read from a diffusers / transformers folder, with ``trained_layers``
    set where the folder is known to keep fewer layers than the network has: diffusers' SD 2.x
    ``text_encoder`` is OpenCLIP ViT-H (width 1024, 16 heads, GELU) with 23 of its 24 layers."""
    vit_h = (OPENCLIP_H.width, OPENCLIP_H.heads, OPENCLIP_H.activation, OPENCLIP_H.vocab_size)
    if (config.width, config.heads, config.activation, config.vocab_size) == vit_h and config.depth < OPENCLIP_H.layers:
        return replace(config, trained_layers=OPENCLIP_H.layers)
    return config


def describe_keys(shapes: Mapping[str, tuple[int, ...] | None], examples: int = 6) -> str:
    """What the keys look like: the top-level prefixes with their counts, and a few example keys
    (with their shapes where known)."""
    counts = Counter(k.split(".", 1)[0] + ("." if "." in k else "") for k in shapes)
    listed = ", ".join(f"{p} ({n})" for p, n in counts.most_common(10))
    more = f" and {len(counts) - 10} more" if len(counts) > 10 else ""
    shown = ", ".join(k if shapes[k] is None else f"{k} {list(shapes[k])}" for k in sorted(shapes)[:examples])
    text = f"The file has {len(shapes)} tensors; top-level prefixes (count): {listed}{more}. Examples: {shown}."
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in shapes):
        text += " These are diffusers names: load the model's folder (with its config.json) instead."
    return text
