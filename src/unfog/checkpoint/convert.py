"""Other namings of the official weights -> unfog's canonical names, one declarative table each.

A table lists ``(source name, canonical name, op)`` rows; ``{i}`` stands for a layer index and
``op`` says how the tensor changes on the way:

- ``"same"``: unchanged;
- ``"T"``: transposed (a raw ``x @ P`` matrix becomes the weight ``P.T`` of an ``nn.Linear``);
- ``"qkv"``: a fused (3W, ...) tensor split along dim 0 into the q, k and v tensors named by
  putting ``q``/``k``/``v`` for ``{qkv}`` (and, on the way back, concatenated).

Converters refuse names their table does not know, so nothing is silently dropped; the few
tensors of the official files that are not weights of the module are listed and ignored.

diffusers' U-Net and VAE number their blocks differently from LDM, so their tables are generated
from the config's block structure (``diffusers_unet_rows``, ``diffusers_vae_rows``): one row per
module, applied to every tensor under it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch

from unfog.models.unet import UNetConfig
from unfog.models.vae import VAEConfig

Op = Literal["same", "T", "qkv"]
Table = tuple[tuple[str, str, Op], ...]

# Tensors of the official CLIP text files that are not weights of the text encoder:
# ``embeddings.position_ids`` (a constant arange some SD 1.x files carry) and OpenCLIP's
# contrastive ``logit_scale``.
CLIP_TEXT_IGNORED = frozenset({"embeddings.position_ids", "logit_scale"})

# One OpenCLIP residual block -> one CLIP encoder layer (the same in the text and image towers).
_RESBLOCK: Table = (
    ("ln_1.weight", "layer_norm1.weight", "same"),
    ("ln_1.bias", "layer_norm1.bias", "same"),
    ("attn.in_proj_weight", "self_attn.{qkv}_proj.weight", "qkv"),
    ("attn.in_proj_bias", "self_attn.{qkv}_proj.bias", "qkv"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight", "same"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias", "same"),
    ("ln_2.weight", "layer_norm2.weight", "same"),
    ("ln_2.bias", "layer_norm2.bias", "same"),
    ("mlp.c_fc.weight", "mlp.fc1.weight", "same"),
    ("mlp.c_fc.bias", "mlp.fc1.bias", "same"),
    ("mlp.c_proj.weight", "mlp.fc2.weight", "same"),
    ("mlp.c_proj.bias", "mlp.fc2.bias", "same"),
)


def _resblocks(src: str, dst: str) -> Table:
    return tuple((src + a, dst + b, op) for a, b, op in _RESBLOCK)


# OpenCLIP text tower (SD 2.x, SDXL encoder 2) -> canonical (OpenAI/transformers) naming.
OPENCLIP_TEXT: Table = (
    ("token_embedding.weight", "embeddings.token_embedding.weight", "same"),
    ("positional_embedding", "embeddings.position_embedding.weight", "same"),
    *_resblocks("transformer.resblocks.{i}.", "encoder.layers.{i}."),
    ("ln_final.weight", "final_layer_norm.weight", "same"),
    ("ln_final.bias", "final_layer_norm.bias", "same"),
    ("text_projection", "text_projection.weight", "T"),
)

# A whole OpenCLIP / OpenAI CLIP model -> transformers' CLIPModel naming (unfog.metrics.clip_model):
# the image tower under ``visual.``, the text tower at the top level, both raw ``x @ P``
# projections transposed into Linear weights.
OPENCLIP_VISION: Table = (
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "same"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", "same"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "same"),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", "same"),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", "same"),
    *_resblocks("visual.transformer.resblocks.{i}.", "vision_model.encoder.layers.{i}."),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", "same"),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", "same"),
    ("visual.proj", "visual_projection.weight", "T"),
)
OPENCLIP_CLIP: Table = (
    *OPENCLIP_VISION,
    *((src, dst if dst == "text_projection.weight" else "text_model." + dst, op) for src, dst, op in OPENCLIP_TEXT),
    ("logit_scale", "logit_scale", "same"),
)
# OpenAI's own CLIP files (the JIT archives' state dicts) also hold three hyper-parameters.
OPENAI_CLIP_IGNORED = frozenset({"input_resolution", "context_length", "vocab_size"})

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, str]:
    """``"a.12.b"`` -> ``("a.{i}.b", "12")``: the first number between dots is the layer index."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return name, ""
    return name[: match.start()] + ".{i}." + name[match.end() :], match.group(1)


def _check_known(
    state_dict: Mapping[str, torch.Tensor], known: set[str], ignored: frozenset[str], what: str
) -> None:
    unknown = sorted(k for k in state_dict if k not in ignored and _template(k)[0] not in known)
    if unknown:
        shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ValueError(f"{len(unknown)} tensors are not in the {what} naming: {shown}")


def apply_table(
    state_dict: Mapping[str, torch.Tensor],
    table: Table,
    ignored: frozenset[str] = frozenset(),
    what: str = "source",
) -> dict[str, torch.Tensor]:
    """Rename (and reshape) every tensor of ``state_dict`` by ``table``, source -> canonical."""
    rules = {src: (dst, op) for src, dst, op in table}
    _check_known(state_dict, set(rules), ignored, what)
    out: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        if name in ignored:
            continue
        template, layer = _template(name)
        dst, op = rules[template]
        dst = dst.replace("{i}", layer)
        if op == "qkv":
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[dst.replace("{qkv}", part)] = chunk.clone()
        else:
            out[dst] = value.t().contiguous() if op == "T" else value
    return out


def invert_table(
    state_dict: Mapping[str, torch.Tensor], table: Table, what: str = "canonical"
) -> dict[str, torch.Tensor]:
    """The inverse of ``apply_table``: canonical -> source naming (q, k, v fused again)."""
    rules = {}
    for src, dst, op in table:
        for part in ("q", "k", "v") if op == "qkv" else ("",):
            rules[dst.replace("{qkv}", part)] = (src, op, part)
    _check_known(state_dict, set(rules), frozenset(), what)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state_dict.items():
        template, layer = _template(name)
        src, op, part = rules[template]
        src = src.replace("{i}", layer)
        if op == "qkv":
            fused.setdefault(src, {})[part] = value
        else:
            out[src] = value.t().contiguous() if op == "T" else value
    for src, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{src}: q, k and v are all needed to fuse, got only {sorted(parts)}")
        out[src] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert_openclip_text(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (prefix already stripped, e.g. ``cond_stage_model.model.``) in
    ``CLIPTextEncoder``'s naming: fused ``in_proj`` split into q/k/v, ``text_projection``
    transposed into a Linear weight, ``logit_scale`` dropped."""
    return apply_table(state_dict, OPENCLIP_TEXT, CLIP_TEXT_IGNORED, "OpenCLIP text")



def convert_openclip_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole OpenCLIP (or OpenAI CLIP) model, prefix stripped, in transformers' ``CLIPModel``
    naming: both towers' fused ``in_proj`` split into q/k/v, ``visual.proj`` and ``text_projection``
    transposed into Linear weights, ``logit_scale`` kept."""
    return apply_table(state_dict, OPENCLIP_CLIP, OPENAI_CLIP_IGNORED, "OpenCLIP CLIP model")

def convert_to_openclip_text(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextEncoder``'s state dict in OpenCLIP naming (the inverse, without logit_scale)."""
    return invert_table(state_dict, OPENCLIP_TEXT, "canonical CLIP text")


def convert_transformers_clip_text(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict (a diffusers
    ``text_encoder`` folder) in canonical naming: the ``text_model.`` prefix goes, ``position_ids``
    is dropped; ``text_projection.weight`` is already canonical."""
    out = {}
    for name, value in state_dict.items():
        name = name.removeprefix("text_model.")
        if name not in CLIP_TEXT_IGNORED:
            out[name] = value
    return out


def canonical_clip_text(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any of the CLIP text namings (prefix stripped) -> canonical, recognised by a sentinel key:
    OpenCLIP (``transformer.resblocks.0.attn.in_proj_weight``), transformers
    (``text_model.embeddings.token_embedding.weight``) or already canonical (the SD 1.x files)."""
    if "transformer.resblocks.0.attn.in_proj_weight" in state_dict:
        return convert_openclip_text(state_dict)
    if "text_model.embeddings.token_embedding.weight" in state_dict:
        return convert_transformers_clip_text(state_dict)
    if "embeddings.token_embedding.weight" in state_dict:
        return {k: v for k, v in state_dict.items() if k not in CLIP_TEXT_IGNORED}
    raise ValueError(
        "not a CLIP text encoder in a known naming: expected one of transformer.resblocks.0.attn."
        "in_proj_weight (OpenCLIP), text_model.embeddings.token_embedding.weight (transformers) or "
        "embeddings.token_embedding.weight (canonical); was the prefix stripped?"
    )


# ---------------------------------------------------------------- diffusers U-Net and VAE
# diffusers names modules by block type (``down_blocks.1.resnets.0``) where LDM numbers them in
# order (``input_blocks.4.0``), so these tables are generated from the config's block structure:
# one row ``(diffusers module, canonical module, op)`` per module, applied to every tensor under
# it (``rename_modules``). ``op`` is "same", or "conv1x1": a Linear weight (C, C) that is a 1x1
# conv (C, C, 1, 1) in the canonical model. Attention modules inside the U-Net share their naming
# (``transformer_blocks.0.attn1.to_q``, ``ff.net.2``, ...), so one row covers each.
ModuleRows = list[tuple[str, str, str]]

# Inside a U-Net residual block: diffusers ``ResnetBlock2D`` -> LDM ``ResBlock``.
UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
# Inside a VAE residual block: only the shortcut is renamed.
VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
              ("conv_shortcut", "nin_shortcut"))
# Inside the VAE's mid-block attention (current names, then the pre-0.14 diffusers ones).
VAE_ATTENTION = (
    ("group_norm", "norm", "same"),
    ("to_q", "q", "conv1x1"),
    ("to_k", "k", "conv1x1"),
    ("to_v", "v", "conv1x1"),
    ("to_out.0", "proj_out", "conv1x1"),
    ("query", "q", "conv1x1"),
    ("key", "k", "conv1x1"),
    ("value", "v", "conv1x1"),
    ("proj_attn", "proj_out", "conv1x1"),
)


def _block(src: str, dst: str, inner: tuple[tuple[str, ...], ...]) -> ModuleRows:
    """Rows for the modules ``inner`` (pairs, or triples with an op) of the block ``src`` -> ``dst``."""
    return [(f"{src}.{row[0]}", f"{dst}.{row[1]}", row[2] if len(row) > 2 else "same") for row in inner]


def diffusers_unet_rows(cfg: UNetConfig) -> ModuleRows:
    """diffusers ``UNet2DConditionModel`` -> canonical modules, for a U-Net of config ``cfg``.

    With R = ``num_res_blocks`` and L levels: ``down_blocks.l`` holds the ResBlocks (and
    attentions) of ``input_blocks.1 + l(R+1) .. l(R+1) + R`` and the downsampler that is
    ``input_blocks.(l+1)(R+1)``; ``up_blocks.b`` is output level ``L-1-b``, i.e. ``output_blocks.
    b(R+1) ..``, its upsampler after the attention of the last one.
    """
    levels, r = len(cfg.channel_mult), cfg.num_res_blocks
    rows: ModuleRows = [
        ("time_embedding.linear_1", "time_embed.0", "same"),
        ("time_embedding.linear_2", "time_embed.2", "same"),
        ("conv_in", "input_blocks.0.0", "same"),
        ("conv_norm_out", "out.0", "same"),
        ("conv_out", "out.2", "same"),
    ]
    if cfg.num_classes == "sequential":
        rows += [
            ("add_embedding.linear_1", "label_emb.0.0", "same"),
            ("add_embedding.linear_2", "label_emb.0.2", "same"),
        ]
    elif cfg.num_classes is not None:
        rows.append(("class_embedding", "label_emb", "same"))
    for level in range(levels):
        attention = cfg.transformer_depth[level] > 0
        for j in range(r):
            dst = f"input_blocks.{1 + level * (r + 1) + j}"
            rows += _block(f"down_blocks.{level}.resnets.{j}", f"{dst}.0", UNET_RESNET)
            if attention:
                rows.append((f"down_blocks.{level}.attentions.{j}", f"{dst}.1", "same"))
        if level < levels - 1:
            dst = f"input_blocks.{(level + 1) * (r + 1)}.0.op"
            rows.append((f"down_blocks.{level}.downsamplers.0.conv", dst, "same"))
    rows += _block("mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    if cfg.transformer_depth_middle:
        rows.append(("mid_block.attentions.0", "middle_block.1", "same"))
    rows += _block("mid_block.resnets.1", f"middle_block.{2 if cfg.transformer_depth_middle else 1}", UNET_RESNET)
    for b in range(levels):
        attention = cfg.transformer_depth[levels - 1 - b] > 0
        for j in range(r + 1):
            dst = f"output_blocks.{b * (r + 1) + j}"
            rows += _block(f"up_blocks.{b}.resnets.{j}", f"{dst}.0", UNET_RESNET)
            if attention:
                rows.append((f"up_blocks.{b}.attentions.{j}", f"{dst}.1", "same"))
        if b < levels - 1:
            dst = f"output_blocks.{b * (r + 1) + r}.{2 if attention else 1}.conv"
            rows.append((f"up_blocks.{b}.upsamplers.0.conv", dst, "same"))
    return rows


def diffusers_vae_rows(cfg: VAEConfig) -> ModuleRows:
    """diffusers ``AutoencoderKL`` -> canonical modules: ``encoder.down_blocks.l`` is
    ``encoder.down.l``; ``decoder.up_blocks.b`` is ``decoder.up.(L-1-b)`` (LDM numbers the
    decoder's levels by resolution, diffusers by order of execution)."""
    levels, r = len(cfg.channel_mult), cfg.num_res_blocks
    rows: ModuleRows = [(name, name, "same") for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", "same"), (f"{part}.conv_norm_out", f"{part}.norm_out", "same"),
                 (f"{part}.conv_out", f"{part}.conv_out", "same")]
        rows += _block(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        rows += _block(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
        rows += _block(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)
    for level in range(levels):
        for j in range(r):
            rows += _block(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", VAE_RESNET)
        if level < levels - 1:
            dst = f"encoder.down.{level}.downsample.conv"
            rows.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", dst, "same"))
    for b in range(levels):
        level = levels - 1 - b
        for j in range(r + 1):
            rows += _block(f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{level}.block.{j}", VAE_RESNET)
        if level > 0:
            rows.append((f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", "same"))
    return rows


def rename_modules(state_dict: Mapping[str, torch.Tensor], rows: ModuleRows, what: str) -> dict[str, torch.Tensor]:
    """Rename every tensor by the row of its longest enclosing module; refuse tensors no row covers."""
    rules = {src: (dst, op) for src, dst, op in rows}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in state_dict.items():
        module = name
        while module not in rules and "." in module:
            module = module.rsplit(".", 1)[0]
        if module not in rules:
            unknown.append(name)
            continue
        dst, op = rules[module]
        if op == "conv1x1" and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        out[dst + name[len(module):]] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ValueError(f"{len(unknown)} tensors are not in the {what} naming: {shown}")
    return out


def convert_diffusers_unet(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers ``unet`` folder's weights in ``UNet``'s (LDM) naming."""
    return rename_modules(state_dict, diffusers_unet_rows(cfg), "diffusers U-Net")


def convert_diffusers_vae(state_dict: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """A diffusers ``vae`` folder's weights in ``AutoencoderKL``'s (LDM) naming."""
    return rename_modules(state_dict, diffusers_vae_rows(cfg), "diffusers VAE")


# diffusers ``ControlNetModel``: the U-Net's encoder under the U-Net's diffusers names, plus the
# hint encoder (``controlnet_cond_embedding``: conv_in, blocks.0..5, conv_out = the official
# ``input_hint_block`` convs 0, 2, ..., 14) and the zero convs.
_ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")


def diffusers_controlnet_rows(cfg: UNetConfig, skips: int, hint_blocks: int = 6) -> ModuleRows:
    """diffusers ``ControlNetModel`` -> canonical modules, for a ControlNet of U-Net config ``cfg``
    with ``skips`` zero convs (one per input block)."""
    rows = [row for row in diffusers_unet_rows(cfg) if row[1].startswith(_ENCODER)]
    rows.append(("controlnet_cond_embedding.conv_in", "input_hint_block.0", "same"))
    rows += [(f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * i + 2}", "same")
             for i in range(hint_blocks)]
    rows.append(("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * hint_blocks + 2}", "same"))
    rows += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", "same") for i in range(skips)]
    rows.append(("controlnet_mid_block", "middle_block_out.0", "same"))
    return rows


def convert_diffusers_controlnet(
    state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig, skips: int
) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's weights in ``ControlNet``'s (official ``cldm``) naming."""
    return rename_modules(state_dict, diffusers_controlnet_rows(cfg, skips), "diffusers ControlNet")
