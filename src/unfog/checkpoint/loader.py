"""Load the models of a checkpoint: an official single file (``.safetensors``, ``.ckpt``) or a
diffusers folder, into unfog's U-Net, VAE and CLIP text encoders.

A single file is read (``io.load_state_dict``; no pickle code runs), its family detected from
sentinel keys (``detect.py``) unless given, split into components by prefix, converted to the
canonical names (OpenCLIP text towers), and loaded with ``strict=True`` into modules built on the
meta device (``assign=True``: no memory is spent on a random initialisation). Every tensor of
the file is either consumed or one of the known non-weights (``IGNORED``); anything else is an
error, as are missing tensors and wrong shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from fnmatch import translate
from pathlib import Path

import torch

from unfog.diffusion.denoiser import Prediction
from unfog.models.tokenizer import CLIPTokenizer
from unfog.models.unet import UNet

from ..choices import check_choice
from ..diffusion.denoiser import PREDICTIONS
from .components import Components, build_module, few
from .convert import canonical_clip_text
from .detect import Component, Family, describe_keys, detect_family, get_family, resolve_family
from .diffusers_folder import load_diffusers_folder
from .io import load_state_dict

# Tensors of official single files that are not weights of the modules (LDM's registered buffers
# of the noise schedule, its learned-logvar, the EMA bookkeeping and copy, the constant
# position_ids of CLIP; sgm's ``denoiser.sigmas`` in SD/SDXL-Turbo files). Shell-style patterns.
IGNORED = (
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "betas",
    "log_one_minus_alphas_cumprod",
    "posterior_*",
    "sqrt_*alphas_cumprod",
    "logvar",
    "model_ema.*",
    "*.position_ids",
    "denoiser.sigmas",
)
# the names of IGNORED as one pattern (also the ControlNet loader's: v1.0 files carry the whole SD model)
IGNORED_NAMES = re.compile("|".join(translate(pattern) for pattern in IGNORED))
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


# ---------------------------------------------------------------- splitting a single file
def split_components(
    state_dict: Mapping[str, torch.Tensor], family: Family, use_ema: bool = False
) -> dict[Component, dict[str, torch.Tensor]]:
    """The tensors of each component of a (resolved) ``family``, prefix stripped, in canonical
    names. Known non-weights (``IGNORED``) are dropped; any other tensor outside the components'
    prefixes is an error naming it.

    use_ema: take the U-Net from the EMA copy (``model_ema.diffusion_model<name without dots>``,
        as LDM stores it) instead of ``model.diffusion_model.*``.
    """
    prefixes = sorted(((family.prefix(c), c) for c in family.components), key=lambda pc: -len(pc[0]))
    parts: dict[Component, dict[str, torch.Tensor]] = {c: {} for c in family.components}
    unknown = []
    for name, value in state_dict.items():
        if IGNORED_NAMES.match(name):
            continue  # position_ids inside a text encoder's prefix too
        component = next((c for p, c in prefixes if name.startswith(p)), None)
        if component is None:
            unknown.append(name)
        else:
            parts[component][name[len(family.prefix(component)):]] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} tensors belong to no component of {family.name} and are not known "
            f"non-weights: {few(unknown)}.\n{describe_keys({k: tuple(state_dict[k].shape) for k in unknown})}"
        )
    for component in ("text_encoder", "text_encoder_2"):
        if component in parts:
            parts[component] = canonical_clip_text(parts[component])
    if use_ema:
        parts["unet"] = ema_unet(state_dict, family)
    return parts


def ema_unet(state_dict: Mapping[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """The EMA copy of the U-Net, in canonical names.

    LDM's ``LitEma`` stores ``model.diffusion_model.input_blocks.0.0.bias`` as
    ``model_ema.diffusion_modelinput_blocks00bias`` (the first name part dropped, the dots
    removed); the dots are put back by matching against the U-Net's own names.
    """
    if "unet" not in family.components or not family.prefix("unet"):
        raise ValueError("use_ema=True needs a full checkpoint with a U-Net under 'model.diffusion_model.'")
    with torch.device("meta"):
        names = list(UNet(family.unet).state_dict())
    owner = family.prefix("unet").split(".", 1)[1].replace(".", "")  # "diffusion_model"
    by_flat = {owner + name.replace(".", ""): name for name in names}
    if len(by_flat) != len(names):
        raise ValueError("the U-Net's names are ambiguous once their dots are removed; cannot map EMA weights")
    ema = {
        k[len(EMA_PREFIX):]: v
        for k, v in state_dict.items()
        if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING
    }
    if not ema:
        raise ValueError("use_ema=True, but the file holds no EMA weights (no 'model_ema.*' tensors)")
    unknown = [EMA_PREFIX + k for k in ema if k not in by_flat]
    if unknown:
        raise ValueError(f"{len(unknown)} EMA tensors match no U-Net weight: {few(unknown)}")
    return {by_flat[k]: v for k, v in ema.items()}


def _what(path: Path, family: Family, component: Component) -> str:
    where = f"under {family.prefix(component)!r}" if family.prefix(component) else "at the top level"
    return f"{path.name}: the {component} weights of {family.name} ({where})"


def load_components(
    path: str | Path,
    family: Family | str | None = None,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = False,
    prediction: Prediction | None = None,
) -> Components:
    """Every model in ``path``: an official single file or a diffusers folder.

    family: the family (or its name, see ``detect.FAMILIES``) for a single file; detected from
        the keys when None. Needed only where the weights cannot tell, e.g. "SDXL_VAE" for a bare
        SDXL VAE file. Not for folders, whose config.json files say what they hold.
    dtype: the dtype of the modules, whatever the file stores (float16, bfloat16, float32).
    use_ema: load the U-Net's EMA weights (``model_ema.*``) of a file that has both.
    prediction: overrides the family's prediction type ("eps", "v", "x0"); SD 2.x 512-base
        files need "eps", as the weights cannot tell (see ``detect.py``).
    """
    path = Path(path)
    if path.is_dir():
        if family is not None or use_ema:
            raise ValueError("family= and use_ema= apply to single files; a diffusers folder's configs say what it is")
        return load_diffusers_folder(path, dtype=dtype, prediction=prediction)
    state_dict, _ = load_state_dict(path)
    if family is None:
        family = detect_family(state_dict)
    else:
        family = resolve_family(get_family(family) if isinstance(family, str) else family, state_dict)
    if prediction is not None:
        family = replace(family, prediction=check_choice("prediction type", prediction, PREDICTIONS))
    parts = split_components(state_dict, family, use_ema=use_ema)
    del state_dict  # the parts hold the tensors now, so cast copies can replace them one by one
    modules = {
        c: build_module(c, getattr(family, c), parts.pop(c), dtype, _what(path, family, c))
        for c in family.components
    }
    tokenizer = CLIPTokenizer.from_bpe_file() if family.text_encoder or family.text_encoder_2 else None
    return Components(
        family,
        **modules,
        tokenizer=tokenizer if family.text_encoder else None,
        tokenizer_2=tokenizer if family.text_encoder_2 else None,
    )
