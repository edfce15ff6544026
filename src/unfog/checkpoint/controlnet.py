"""ControlNet files -> ``models.controlnet.ControlNet``.

Three layouts are read, each recognised from its keys:

- the official single files (``cldm``; lllyasviel's v1.0 / v1.1 and the community's): every
  tensor under ``control_model.`` (the v1.0 ``.pth`` files also hold the whole SD model, which is
  ignored) or at the top level (the pruned ``.safetensors``); sentinel ``input_hint_block.0.weight``.
- ``difference`` files (made by sd-webui-controlnet's ``extract_controlnet_diff.py``): the same
  names, plus a marker tensor ``difference``; every tensor that the U-Net also has (time embedding,
  input and middle blocks) is stored as the ControlNet's weight minus the base U-Net's, so it is
  only usable with that base: ``base=`` adds the base U-Net's weights back, as sd-webui-controlnet
  does with the U-Net loaded at the time.
- diffusers folders (``config.json`` with ``_class_name: ControlNetModel`` and
  ``diffusion_pytorch_model[.fp16].safetensors``; most SDXL ControlNets), renamed by
  ``convert.diffusers_controlnet_rows``.

unfog writes the first layout (``save_controlnet``: ``control_model.``, what training saves) and
adds the U-Net config as JSON metadata (format ``unfog-controlnet``), which the reader uses when
present, so ControlNets of models of no SD family (the embedded ``shapes`` model) load too.

The family is read off the encoder as for a checkpoint's U-Net (``detect.unet_signature``): SD 1.x,
SD 2.x or SDXL. Whatever dtype the file stores (fp16 included), the module gets ``dtype``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch

from unfog.models.controlnet import HINT_CONVS, ControlNet, ControlNetConfig
from unfog.models.unet import UNet, UNetConfig

from .components import fill_module, few
from .convert import convert_diffusers_controlnet
from .detect import FAMILIES, UNET_PREFIX, VAE_PREFIX, config_signature, describe_keys, unet_signature
from .diffusers_folder import UNET_BLOCKS, unet_config_from_diffusers, weights_file
from .io import load_state_dict, save_safetensors
from .loader import IGNORED_NAMES

CONTROL_PREFIX = "control_model."
SENTINEL = "input_hint_block.0.weight"
DIFFUSERS_SENTINEL = "controlnet_cond_embedding.conv_in.weight"
DIFFERENCE = "difference"
FORMAT = "unfog-controlnet"  # the metadata of the files unfog writes
# The rest of the SD model that the v1.0 full ``.pth`` files carry beside ``control_model.``.
SD_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")
# The U-Net families a ControlNet can be made for (inpainting U-Nets take the same ControlNets).
CONTROLLED = ("SD15", "SD2", "SDXL_BASE")
# Settings of diffusers' ControlNetModel that unfog's ControlNet has one way only.
DIFFUSERS_FIXED = {
    "conditioning_embedding_out_channels": [c for c, _ in HINT_CONVS[::2]],  # 16, 32, 96, 256
    "controlnet_conditioning_channel_order": "rgb",
}


class NeedsBase(ValueError):
    """A 'difference' ControlNet loaded without ``base=``: a caller holding the U-Net can retry with it."""


def family_name(config: UNetConfig) -> str:
    """The family whose U-Net has the signature of ``config`` (``detect.config_signature``), else
    that family with other input channels (a ControlNet of an inpainting model's family), else a
    description."""
    signature = config_signature(config)
    unets = {name: config_signature(f.unet) for name, f in FAMILIES.items() if f.unet is not None}
    exact = [name for name, s in unets.items() if s == signature]
    similar = [name for name, s in unets.items() if (s[0], *s[2:]) == (signature[0], *signature[2:])]
    if exact or similar:
        return (exact or similar)[0]
    return f"a custom U-Net (model_channels={config.model_channels}, context_dim={config.context_dim})"


def check_controlnet_family(controlnet: ControlNet, unet: UNet) -> None:
    """Refuse a ControlNet whose residuals cannot join ``unet``'s skips, naming both families."""
    a, b = controlnet.config, unet.config
    fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")
    if any(getattr(a, f) != getattr(b, f) for f in fields):
        raise ValueError(
            f"this ControlNet is for {family_name(a)} but the model is {family_name(b)}; "
            f"use a ControlNet made for {family_name(b)}"
        )


def load_controlnet(path: str | Path, base: UNet | None = None, dtype: torch.dtype = torch.float32,
                    global_pool: bool | None = None) -> ControlNet:
    """The ControlNet in ``path``: an official single file (``control_model.`` prefix or none, a
    ``difference`` file with ``base=`` the U-Net it was made against) or a diffusers folder.

    ``global_pool`` (``ControlNetConfig``): None reads it from a diffusers config's
    ``global_pool_conditions`` or unfog's metadata; an official SD 1.x / 2.x file has no such
    field (its yaml has), so, as sd-webui-controlnet decides, one whose file name has "shuffle"
    in it (``control_v11e_sd15_shuffle``) is pooled."""
    path = Path(path)
    if path.is_dir():
        return _load_diffusers(path, dtype, global_pool=global_pool)
    state_dict, metadata = load_state_dict(path)
    weights = _control_tensors(state_dict, path)
    if DIFFUSERS_SENTINEL in weights:
        if (path.parent / "config.json").is_file():
            return _load_diffusers(path.parent, dtype, path, global_pool)
        raise ValueError(f"{path.name} holds a ControlNet in diffusers naming without its config.json: load the "
                         "folder with config.json and this file")
    if metadata.get("format") == FORMAT:
        config = ControlNetConfig(UNetConfig(**metadata["unet"]), hint_channels=int(metadata["hint_channels"]),
                                  global_pool=bool(metadata.get("global_pool", False)))
    else:
        config = _config_from_keys(weights, path)
        sd_family = config.unet.num_classes != "sequential"  # SDXL files are never pooled by name (as A1111)
        config = replace(config, global_pool="shuffle" in path.stem.lower() and sd_family)
    if global_pool is not None:
        config = replace(config, global_pool=global_pool)
    if DIFFERENCE in weights:
        weights = _add_base(weights, base, config.unet, path)
    elif base is not None:
        raise ValueError(f"{path.name} is a complete ControlNet, not a 'difference' one: leave base= out")
    with torch.device("meta"):
        module = ControlNet(config)
    return fill_module(module, weights, dtype, f"{path.name}: the ControlNet weights ({family_name(config.unet)})")


def save_controlnet(controlnet: ControlNet, path: str | Path, metadata: Mapping[str, object] = (), *,
                    overwrite: bool = False) -> None:
    """Write ``controlnet`` in the official single-file layout (every tensor under ``control_model.``,
    as A1111, ComfyUI and ``load_controlnet`` read it), float32, atomically, with its U-Net config
    and ``metadata`` (JSON values) in the header. An existing file is refused unless ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a ControlNet is saved as .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    config = controlnet.control_config
    tensors = {CONTROL_PREFIX + k: v.detach().float() for k, v in controlnet.state_dict().items()}
    save_safetensors(path, tensors, {**dict(metadata), "format": FORMAT, "unet": asdict(config.unet),
                                     "hint_channels": config.hint_channels, "global_pool": config.global_pool})


def _control_tensors(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors, ``control_model.`` stripped; the SD model of v1.0 files dropped."""
    if not any(k.startswith(CONTROL_PREFIX) for k in state_dict):
        if SENTINEL in state_dict or DIFFUSERS_SENTINEL in state_dict:
            return state_dict
        raise ValueError(f"{path.name} is not a ControlNet: it has no {SENTINEL} (official, with or without "
                         f"{CONTROL_PREFIX!r}) nor {DIFFUSERS_SENTINEL} (diffusers).\n{describe_keys(state_dict)}")
    weights = {k.removeprefix(CONTROL_PREFIX): v for k, v in state_dict.items()
               if k.startswith(CONTROL_PREFIX) or k == DIFFERENCE}
    other = [k for k in state_dict if not k.startswith((CONTROL_PREFIX, *SD_PREFIXES)) and k != DIFFERENCE
             and not IGNORED_NAMES.match(k)]
    if other:
        raise ValueError(f"{path.name}: {len(other)} tensors are neither under {CONTROL_PREFIX!r} nor part of an SD "
                         f"model: {few(other)}")
    if SENTINEL not in weights:
        raise ValueError(f"{path.name} has tensors under {CONTROL_PREFIX!r} but no {CONTROL_PREFIX}{SENTINEL}: "
                         "not a ControlNet layout unfog knows")
    return weights


_TRANSFORMER = re.compile(r"^(input_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.")


def _config_from_keys(weights: Mapping[str, torch.Tensor], path: Path) -> ControlNetConfig:
    """The family's U-Net config, with the transformer depths the file has (SDXL's "mid" and
    "small" ControlNets are thinner than the U-Net), and the hint's channel count."""
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    signature = unet_signature(shapes, "")
    signature = (signature[0], 4, *signature[2:])  # ControlNets of inpainting models take the 4-channel latent
    matches = [n for n in CONTROLLED if config_signature(FAMILIES[n].unet) == signature]
    if not matches:
        known = "; ".join(f"{n} {config_signature(FAMILIES[n].unet)}" for n in CONTROLLED)
        raise ValueError(f"{path.name}: the ControlNet's encoder has (model_channels, in_channels, context_dim, "
                         f"linear projections, label_emb input width) = {signature}, which matches no supported "
                         f"family. Supported: {known}.")
    unet = FAMILIES[matches[0]].unet
    depth = {}  # "middle" or input block index -> transformer layers
    for key in weights:
        if m := _TRANSFORMER.match(key):
            where = m.group(2) or "middle"
            depth[where] = max(depth.get(where, 0), int(m.group(3)) + 1)
    r = unet.num_res_blocks
    levels = tuple(depth.get(str(1 + level * (r + 1)), 0) for level in range(len(unet.channel_mult)))
    unet = replace(unet, transformer_depth=levels, transformer_depth_middle=depth.get("middle", 0))
    return ControlNetConfig(unet, hint_channels=shapes[SENTINEL][1])


def _add_base(
    weights: dict[str, torch.Tensor], base: UNet | None, config: UNetConfig, path: Path
) -> dict[str, torch.Tensor]:
    """A difference file's weights made whole: the base U-Net's tensor added to each it shares."""
    if base is None:
        raise NeedsBase(f"{path.name} is a 'difference' ControlNet (its encoder is stored as the difference from a "
                         "base U-Net, usually SD 1.5): pass base= the U-Net to add it to, e.g. pipe.unet")
    if family_name(base.config) != family_name(config):
        raise ValueError(f"{path.name} is a 'difference' ControlNet for {family_name(config)}, but base= is "
                         f"{family_name(base.config)}")
    reference = base.state_dict()
    whole = {}
    for key, value in weights.items():
        if key == DIFFERENCE:
            continue
        if key in reference:
            if reference[key].shape != value.shape:
                raise ValueError(f"{path.name}: {key} is {tuple(value.shape)} in the difference file but "
                                 f"{tuple(reference[key].shape)} in base=")
            value = value.float() + reference[key].detach().to("cpu", torch.float32)
        whole[key] = value
    return whole


def _load_diffusers(folder: Path, dtype: torch.dtype, weights_path: Path | None = None,
                    global_pool: bool | None = None) -> ControlNet:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a diffusers ControlNet folder")
    c = json.loads(config_path.read_text(encoding="utf-8"))
    what = f"{folder.name}/config.json"
    if c.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{what}: _class_name={c['_class_name']!r}; unfog reads ControlNetModel folders only")
    for key, supported in DIFFUSERS_FIXED.items():
        if key in c and c[key] != supported:
            raise ValueError(f"{what}: {key}={c[key]!r} is not supported (unfog's ControlNet has {supported!r})")
    up = [UNET_BLOCKS.get(b, b) for b in reversed(c["down_block_types"])]  # a ControlNet has no decoder
    unet = unet_config_from_diffusers({**c, "up_block_types": up})
    pooled = bool(c.get("global_pool_conditions", False)) if global_pool is None else global_pool
    config = ControlNetConfig(unet, hint_channels=c.get("conditioning_channels", 3), global_pool=pooled)
    state_dict, _ = load_state_dict(weights_path or weights_file(folder))
    with torch.device("meta"):
        module = ControlNet(config)
    weights = convert_diffusers_controlnet(state_dict, unet, len(module.zero_convs))
    return fill_module(module, weights, dtype, f"{folder.name}: the diffusers ControlNet ({family_name(unet)})")
