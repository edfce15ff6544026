"""Reference models for the parity tests, built with diffusers / transformers: diffusers' U-Net and
VAE holding the weights of ours (converted with diffusers' own single-file converters), and
transformers CLIP text models paired with ours.

Import with ``sys.path.insert(0, <tests/parity dir>)`` then ``from oracles import ...``; torch-only
helpers are in ``tests/model_checks.py``.
"""

from __future__ import annotations

import sys
import types
from itertools import chain
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from unfog.checkpoint.convert import convert_transformers_clip_text
from unfog.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from unfog.models.unet import UNet, UNetConfig
from unfog.models.vae import AutoencoderKL, VAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_  # noqa: E402

CLIP_VOCAB, CLIP_LAYERS = 49408, 3  # clip_pair: the real vocabulary, three layers

# ---------------------------------------------------------------- U-Net


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    """The arguments of diffusers' UNet2DConditionModel / ControlNetModel for the architecture of
    ``cfg`` (the decoder's block types aside)."""
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    # diffusers gives the middle block the depth of the deepest level (the last entry of
    # transformer_layers_per_block); a level without attention ignores its entry, so there the
    # entry can carry the middle depth (the SDXL refiner: levels (0, 4, 4, 0), middle 4).
    mid = cfg.transformer_depth_middle
    assert mid >= 1 and cfg.transformer_depth[-1] in (0, mid)
    depths = tuple(d or mid for d in cfg.transformer_depth)
    attn = [d > 0 for d in cfg.transformer_depth]
    if cfg.num_heads is not None:
        heads = [cfg.num_heads] * len(chans)  # diffusers' "attention_head_dim" is a head count
    else:
        heads = [c // cfg.num_head_channels for c in chans]
    return dict(
        in_channels=cfg.in_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        block_out_channels=tuple(chans),
        layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=tuple(heads),
        transformer_layers_per_block=depths,
        use_linear_projection=cfg.use_linear_projection,
    )


def diffusers_twin(cfg: UNetConfig, **extra) -> diffusers.UNet2DConditionModel:
    """diffusers' UNet2DConditionModel with the same architecture as ``cfg``."""
    kwargs = diffusers_unet_kwargs(cfg)
    up = tuple(b.replace("Down", "Up") for b in reversed(kwargs["down_block_types"]))
    return diffusers.UNet2DConditionModel(
        out_channels=cfg.out_channels, up_block_types=up, **kwargs, **extra
    ).eval()


def load_into_diffusers(ours: UNet, twin: diffusers.UNet2DConditionModel, assign: bool = False) -> None:
    """Our U-Net's weights, in the official LDM names, through diffusers' single-file converter.
    ``assign=True`` makes ``twin`` take the converted tensors themselves (see ``shared_twin``)."""
    ldm = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ldm, dict(twin.config))
    twin.load_state_dict(converted, strict=True, assign=assign)


def shared_twin(ours: UNet, **extra) -> diffusers.UNet2DConditionModel:
    """diffusers' twin of ``ours`` that holds ``ours``'s own weight tensors: built on the meta
    device (no memory), then loaded with ``assign=True`` from diffusers' converter, which only
    renames, so the pair costs the memory of one model (SDXL: 10.3 GB in float32, not 20.6).
    Writing to either model's weights writes to the other's."""
    with torch.device("meta"):
        twin = diffusers_twin(ours.config, **extra)
    load_into_diffusers(ours, twin, assign=True)
    left = [name for name, t in chain(twin.named_parameters(), twin.named_buffers()) if t.is_meta]
    assert not left, f"still on the meta device after loading: {left[:5]}"
    return twin


# ---------------------------------------------------------------- VAE


def vae_diffusers_config(cfg: VAEConfig) -> dict:
    """The config of diffusers' AutoencoderKL with the same architecture as ``cfg``."""
    levels = len(cfg.channel_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.level_channels,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=32,
        scaling_factor=cfg.scaling_factor,
    )


def vae_to_diffusers(ours: AutoencoderKL) -> diffusers.AutoencoderKL:
    """diffusers' AutoencoderKL holding our VAE's weights (prefixed ``first_stage_model.`` as in a
    single-file checkpoint, converted by diffusers' single-file converter, loaded strictly)."""
    config = vae_diffusers_config(ours.config)
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return theirs


# ---------------------------------------------------------------- CLIP text


def clip_pair(width: int, heads: int, activation: str, projection: int | None, seed: int):
    """A random transformers CLIP text model and our encoder holding the same weights."""
    config = transformers.CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=activation,
        projection_dim=projection or 512,
        bos_token_id=49406,
        eos_token_id=2,  # the legacy (argmax) pooling of the official configs
        attn_implementation="eager",
    )
    cls = transformers.CLIPTextModel if projection is None else transformers.CLIPTextModelWithProjection
    ref = randomize_(cls(config), seed=seed).eval()
    ours = CLIPTextEncoder(
        CLIPTextConfig(
            width=width, layers=CLIP_LAYERS, heads=heads, activation=activation, projection_dim=projection
        )
    ).eval()
    ours.load_state_dict(convert_transformers_clip_text(ref.state_dict()), strict=True)
    return ref, ours


def with_text_model_alias(model: transformers.CLIPTextModel) -> transformers.CLIPTextModel:
    """transformers >= 5.6 flattened ``CLIPTextModel`` (no ``.text_model``; transformers#46285), but
    diffusers 0.42.1's SD 1.x ``encode_prompt`` still reads ``text_encoder.text_model.
    final_layer_norm`` when clip_skip is set and raises AttributeError (diffusers#14124, open).
    Give the model that attribute, pointing at its own ``final_layer_norm``; diffusers' computation
    is otherwise untouched. (A plain attribute, not a submodule, so the module tree is unchanged.)"""
    if "text_model" not in dir(model):
        alias = types.SimpleNamespace(final_layer_norm=model.final_layer_norm)
        object.__setattr__(model, "text_model", alias)
    return model
