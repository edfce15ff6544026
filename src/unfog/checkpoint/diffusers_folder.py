"""diffusers folders: ``model_index.json`` and one sub-folder per component.

    unet/            config.json + diffusion_pytorch_model[.fp16].safetensors  (UNet2DConditionModel)
    vae/             config.json + diffusion_pytorch_model[.fp16].safetensors  (AutoencoderKL)
    text_encoder/    config.json + model[.fp16].safetensors                    (transformers CLIP)
    text_encoder_2/  (SDXL; the refiner has only this one)
    tokenizer/, tokenizer_2/   vocab.json + merges.txt
    scheduler/       scheduler_config.json

Each ``config.json`` is read into our config (refusing settings our modules do not have), the
weights are renamed by the tables of ``convert.py`` and loaded with ``strict=True``. The family
is the preset whose U-Net config matches ("CUSTOM" if none); unlike a single file, a folder says
its prediction type and schedule (``scheduler/``) and its VAE scaling factor.

One difference from the single files: diffusers' SD 2.x ``text_encoder`` keeps only 23 of
OpenCLIP ViT-H's 24 layers (SD 2 reads the penultimate one), so its last layer is the single
file's penultimate. Its config says ``trained_layers=24`` (``detect.with_trained_depth``), and the
readout, which counts "CLIP skip" from the trained depth, reads the same layer from both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unfog.diffusion.denoiser import Prediction
from unfog.models.clip_text import CLIPTextConfig
from unfog.models.tokenizer import CLIPTokenizer
from unfog.models.unet import UNetConfig
from unfog.models.vae import VAEConfig

from ..choices import check_choice
from ..diffusion.denoiser import PREDICTIONS as PREDICTION_TYPES  # ours; PREDICTIONS below maps diffusers names
from .components import Components, build_module
from .convert import convert_diffusers_unet, convert_diffusers_vae, convert_transformers_clip_text
from .detect import FAMILIES, Family, SchedulerConfig, with_trained_depth
from .io import load_state_dict

WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers, transformers, older
WEIGHT_EXTENSIONS = (".safetensors", ".bin")
TEXT = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

# Settings of diffusers' UNet2DConditionModel that unfog's U-Net has one way only: the value we
# support (diffusers' default, which every Stable Diffusion config uses).
UNET_FIXED: dict[str, Any] = {
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "class_embed_type": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "cross_attention_norm": None,
    "only_cross_attention": False, "dual_cross_attention": False, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "reverse_transformer_layers_per_block": None,
}
VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None,
}
UNET_BLOCKS = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers schedulers whose timestep_spacing defaults to "leading" (the others: "linspace").
LEADING_BY_DEFAULT = {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler"}


def _check_fixed(config: dict, fixed: dict[str, Any], what: str) -> None:
    for key, supported in fixed.items():
        if key in config and config[key] != supported:
            raise ValueError(f"{what}: {key}={config[key]!r} is not supported (unfog's model has {key}={supported!r})")


def _per_level(value: Any, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries for {levels} levels")
    return values


def _level_multipliers(channels: list[int], what: str) -> tuple[int, tuple[int, ...]]:
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"{what}: block_out_channels {channels} are not multiples of the first")
    return base, tuple(c // base for c in channels)


def unet_config_from_diffusers(c: dict) -> UNetConfig:
    """Our U-Net config for a diffusers ``UNet2DConditionModel`` config.json."""
    what = "diffusers U-Net config"
    _check_fixed(c, UNET_FIXED, what)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if any(b not in UNET_BLOCKS for b in down) or up != [UNET_BLOCKS[b] for b in reversed(down)]:
        raise ValueError(f"{what}: unsupported block types down={down}, up={up}")
    levels = len(down)
    model_channels, mult = _level_multipliers(list(c["block_out_channels"]), what)
    layers = set(_per_level(c.get("layers_per_block", 2), levels, "layers_per_block"))
    context = set(_per_level(c.get("cross_attention_dim", 1280), levels, "cross_attention_dim"))
    if len(layers) != 1 or len(context) != 1:
        raise ValueError(f"{what}: layers_per_block and cross_attention_dim must be the same at every level")
    transformers = _per_level(c.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    depth = tuple(n if b == "CrossAttnDownBlock2D" else 0 for n, b in zip(transformers, down))
    # diffusers' "attention_head_dim" is a head count (a historical misnomer).
    heads = _per_level(c.get("num_attention_heads") or c.get("attention_head_dim", 8), levels, "attention_head_dim")
    attended = [*(i for i, d in enumerate(depth) if d), levels - 1]  # the middle block is at the last level
    kwargs = _heads(heads, [model_channels * m for m in mult], attended, what)
    if c.get("addition_embed_type") == "text_time":
        kwargs |= dict(num_classes="sequential", adm_in_channels=c["projection_class_embeddings_input_dim"])
    elif c.get("addition_embed_type") is not None:
        raise ValueError(f"{what}: addition_embed_type={c['addition_embed_type']!r} is not supported")
    elif c.get("num_class_embeds") is not None:
        kwargs |= dict(num_classes=c["num_class_embeds"])
    shift = {"default": False, "scale_shift": True}.get(c.get("resnet_time_scale_shift", "default"))
    if shift is None:
        raise ValueError(f"{what}: resnet_time_scale_shift={c['resnet_time_scale_shift']!r} is not supported")
    return UNetConfig(
        in_channels=c.get("in_channels", 4),
        out_channels=c.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=mult,
        num_res_blocks=layers.pop(),
        transformer_depth=depth,
        transformer_depth_middle=transformers[-1],  # diffusers' mid block takes the last level's depth
        context_dim=context.pop(),
        use_linear_projection=c.get("use_linear_projection", False),
        use_scale_shift_norm=shift,
        dropout=c.get("dropout", 0.0),
        **kwargs,
    )


def _heads(heads: list[int], channels: list[int], attended: list[int], what: str) -> dict:
    """A fixed head count (SD1) or a fixed head width (SD2, SDXL) over the attended levels."""
    if len({heads[i] for i in attended}) == 1:
        return dict(num_heads=heads[attended[0]], num_head_channels=None)
    widths = {channels[i] // heads[i] for i in attended}
    if len(widths) == 1 and all(channels[i] % heads[i] == 0 for i in attended):
        return dict(num_heads=None, num_head_channels=widths.pop())
    raise ValueError(f"{what}: heads per level {heads} give neither a fixed head count nor a fixed head width")


def vae_config_from_diffusers(c: dict) -> VAEConfig:
    """Our VAE config for a diffusers ``AutoencoderKL`` config.json."""
    what = "diffusers VAE config"
    _check_fixed(c, VAE_FIXED, what)
    down, up = set(c.get("down_block_types", ())), set(c.get("up_block_types", ()))
    if down != {"DownEncoderBlock2D"} or up != {"UpDecoderBlock2D"}:
        raise ValueError(f"{what}: unsupported block types down={sorted(down)}, up={sorted(up)}")
    base, mult = _level_multipliers(list(c["block_out_channels"]), what)
    return VAEConfig(
        in_channels=c.get("in_channels", 3),
        out_channels=c.get("out_channels", 3),
        latent_channels=c.get("latent_channels", 4),
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=c.get("layers_per_block", 1),
        scaling_factor=c.get("scaling_factor", 0.18215),
    )


def clip_config_from_transformers(c: dict, has_projection: bool) -> CLIPTextConfig:
    """Our CLIP text config for a transformers ``CLIPTextConfig`` config.json. transformers pools
    at the largest token id when ``eos_token_id`` is the legacy 2, else at ``eos_token_id``."""
    if "hidden_size" not in c:
        raise ValueError("not a transformers CLIP text config (no hidden_size); a full CLIPModel is not supported")
    width, hidden = c["hidden_size"], c.get("intermediate_size", 4 * c["hidden_size"])
    if hidden % width:
        raise ValueError(f"CLIP text config: intermediate_size {hidden} is not a multiple of hidden_size {width}")
    eos = c.get("eos_token_id", 2)
    argmax = eos == 2
    return CLIPTextConfig(
        vocab_size=c.get("vocab_size", 49408),
        width=width,
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        max_positions=c.get("max_position_embeddings", 77),
        mlp_ratio=hidden // width,
        activation=c.get("hidden_act", "quick_gelu"),
        projection_dim=c.get("projection_dim", width) if has_projection else None,
        pooling="argmax" if argmax else "eos_token",
        eos_token_id=c.get("vocab_size", 49408) - 1 if argmax else eos,  # with argmax: the largest id
        layer_norm_eps=c.get("layer_norm_eps", 1e-5),
    )


def scheduler_from_diffusers(c: dict) -> tuple[SchedulerConfig, Prediction]:
    """The noise schedule and prediction type of a diffusers ``scheduler_config.json``."""
    if c.get("trained_betas") is not None:
        raise ValueError("scheduler config: trained_betas (an explicit beta list) is not supported")
    kind = SCHEDULE_NAMES.get(c.get("beta_schedule", "linear"))
    prediction = PREDICTIONS.get(c.get("prediction_type", "epsilon"))
    default_spacing = "leading" if c.get("_class_name") in LEADING_BY_DEFAULT else "linspace"
    spacing = c.get("timestep_spacing", default_spacing)
    if kind is None or prediction is None or spacing not in ("leading", "linspace", "trailing"):
        raise ValueError(
            f"scheduler config: unsupported beta_schedule={c.get('beta_schedule')!r}, prediction_type="
            f"{c.get('prediction_type')!r} or timestep_spacing={spacing!r}; supported: {sorted(SCHEDULE_NAMES)}, "
            f"{sorted(PREDICTIONS)}, ['leading', 'linspace', 'trailing']"
        )
    schedule = SchedulerConfig(
        beta_schedule=kind,
        beta_start=c.get("beta_start", 0.0001),
        beta_end=c.get("beta_end", 0.02),
        num_timesteps=c.get("num_train_timesteps", 1000),
        spacing=spacing,
        steps_offset=c.get("steps_offset", 0),
        zero_terminal_snr=c.get("rescale_betas_zero_snr", False),
    )
    return schedule, prediction


# ---------------------------------------------------------------- files
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def weights_file(folder: Path, variant: str | None = None) -> Path:
    """The weights of a component folder: ``<name>[.<variant>].<ext>``; without a variant, the
    plain file, else an fp16 one (folders downloaded as fp16 only)."""
    if variant:
        stems = [f"{n}.{variant}" for n in WEIGHT_NAMES]
    else:
        stems = [*WEIGHT_NAMES, *(f"{n}.fp16" for n in WEIGHT_NAMES)]
    for stem in stems:
        for ext in WEIGHT_EXTENSIONS:
            if (folder / (stem + ext)).is_file():
                return folder / (stem + ext)
    found = sorted(p.name for p in folder.iterdir())
    sharded = " (sharded weights, *.index.json, are not supported)" if any(".index" in n for n in found) else ""
    raise FileNotFoundError(
        f"no weights in {folder}{sharded}: expected one of "
        f"{', '.join(s + WEIGHT_EXTENSIONS[0] for s in stems)}; found {found}"
    )


def _required(path: Path) -> set[str]:
    """Sub-folders a pipeline folder must have: those model_index.json names (with a library),
    else the Stable Diffusion set; and a tokenizer with each text encoder and vice versa."""
    index = path / "model_index.json"
    if index.is_file():
        listed = _read_json(index)
        required = {k for k in PARTS if isinstance(listed.get(k), list) and listed[k][0] is not None}
    else:
        required = {"unet", "vae", "scheduler", "text_encoder", "tokenizer"}
    for encoder, tokenizer in TEXT:
        if encoder in required or tokenizer in required or (path / encoder).is_dir() or (path / tokenizer).is_dir():
            required |= {encoder, tokenizer}
    return required


def load_diffusers_folder(
    path: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None,
    prediction: Prediction | None = None,
) -> Components:
    """Every model of a diffusers pipeline folder (see the module docstring), or the one model of a
    component folder (``config.json`` + weights, e.g. a VAE). ``variant="fp16"`` picks the
    ``*.fp16.*`` weights; ``prediction`` overrides the scheduler's prediction type."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        parts = {_component_kind(_read_json(path / "config.json"), path): path}
    elif not (path / "model_index.json").is_file() and not any((path / p).is_dir() for p in PARTS):
        raise ValueError(f"{path} is a folder but not a diffusers model folder (it has no model_index.json, no "
                         "config.json of one component, no unet/, vae/, text_encoder/ ... sub-folder); unfog expected "
                         "a .safetensors / .ckpt file or a diffusers folder")
    else:
        for part in sorted(_required(path)):
            if not (path / part).is_dir():
                raise FileNotFoundError(f"{path} is a diffusers folder without its {part}/ sub-folder")
        parts = {p: path / p for p in ("unet", "vae", "text_encoder", "text_encoder_2") if (path / p).is_dir()}
    configs, modules = {}, {}
    for part, folder in parts.items():
        configs[part], modules[part] = _load_part(folder, part, dtype, variant)
    _check_context(configs)
    schedule, scheduled = SchedulerConfig(), "eps"
    if (path / "scheduler").is_dir():
        schedule, scheduled = scheduler_from_diffusers(_read_json(path / "scheduler" / "scheduler_config.json"))
    unet = configs.get("unet")
    if unet is None:
        prediction = None
    elif prediction is None:
        prediction = scheduled
    name = next((f.name for f in FAMILIES.values() if unet is not None and f.unet == unet), "CUSTOM")
    prediction = check_choice("prediction type", prediction, PREDICTION_TYPES) if prediction else None
    family = Family(name, prediction, **configs, scheduler=schedule)
    tokenizers = {t: _tokenizer(path / t) for _, t in TEXT if (path / t).is_dir()}
    return Components(family, **modules, **tokenizers)


# The class a component folder's config.json names (diffusers' _class_name, transformers'
# architectures) -> which component it is.
COMPONENT_CLASSES = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder",
}


def _component_kind(config: dict, folder: Path) -> str:
    names = [config.get("_class_name"), *config.get("architectures", [])]
    kind = next((COMPONENT_CLASSES[n] for n in names if n in COMPONENT_CLASSES), None)
    if kind is None:
        raise ValueError(f"{folder}/config.json describes {names}; supported: {', '.join(COMPONENT_CLASSES)}")
    return kind


def _load_part(folder: Path, part: str, dtype: torch.dtype, variant: str | None):
    config = _read_json(folder / "config.json")
    weights, _ = load_state_dict(weights_file(folder, variant))
    if part == "unet":
        cfg = unet_config_from_diffusers(config)
        weights = convert_diffusers_unet(weights, cfg)
    elif part == "vae":
        cfg = vae_config_from_diffusers(config)
        weights = convert_diffusers_vae(weights, cfg)
    else:
        weights = convert_transformers_clip_text(weights)
        cfg = with_trained_depth(clip_config_from_transformers(config, "text_projection.weight" in weights))
    return cfg, build_module(part, cfg, weights, dtype, f"{folder}: the weights")


def _check_context(configs: dict) -> None:
    """The text encoders' widths must add up to the U-Net's cross-attention width."""
    unet = configs.get("unet")
    encoders = {k: configs[k].width for k in ("text_encoder", "text_encoder_2") if k in configs}
    if unet is not None and encoders and sum(encoders.values()) != unet.context_dim:
        raise ValueError(
            f"the U-Net attends to a context of width {unet.context_dim}, but the text encoders give "
            f"{sum(encoders.values())} ({', '.join(f'{k}: {w}' for k, w in encoders.items())}); "
            "is a text_encoder sub-folder missing or from another model?"
        )


def _tokenizer(folder: Path) -> CLIPTokenizer:
    """A tokenizer folder: ``vocab.json`` + ``merges.txt`` (the hub's folders), or only the
    ``tokenizer.json`` that transformers 5 writes (its BPE model holds the same vocab and merges)."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_folder(folder)
    if (folder / "tokenizer.json").is_file():
        model = _read_json(folder / "tokenizer.json").get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{folder / 'tokenizer.json'} is not a BPE tokenizer (type {model.get('type')!r})")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return CLIPTokenizer(model["vocab"], merges)
    raise FileNotFoundError(f"{folder} has no tokenizer: expected vocab.json and merges.txt, or tokenizer.json")
