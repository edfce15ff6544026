"""Other namings of the official weights -> unfog's canonical names, one declarative table each.

A table lists ``(source name, canonical name, op)`` rows; ``{i}`` stands for a layer index and
``op`` says how the tensor changes on the way:

- ``"same"``: unchanged;
- ``"T"``: transposed (a raw ``x @ P`` matrix becomes the weight ``P.T`` of an ``nn.Linear``);
- ``"qkv"``: a fused (3W, ...) tensor split along dim 0 into the q, k and v tensors named by
  putting ``q``/``k``/``v`` for ``{qkv}`` (and, on the way back, concatenated).

Converters refuse names their table does not know, so nothing is silently dropped; the few
tensors of the official files that are not weights of the module are listed and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch

Op = Literal["same", "T", "qkv"]
Table = tuple[tuple[str, str, Op], ...]

# Tensors of the official CLIP text files that are not weights of the text encoder:
# ``embeddings.position_ids`` (a constant arange some SD 1.x files carry) and OpenCLIP's
# contrastive ``logit_scale``.
CLIP_TEXT_IGNORED = frozenset({"embeddings.position_ids", "logit_scale"})

# OpenCLIP text tower (SD 2.x, SDXL encoder 2) -> canonical (OpenAI/transformers) naming.
_BLOCK, _LAYER = "transformer.resblocks.{i}.", "encoder.layers.{i}."
OPENCLIP_TEXT: Table = (
    ("token_embedding.weight", "embeddings.token_embedding.weight", "same"),
    ("positional_embedding", "embeddings.position_embedding.weight", "same"),
    (_BLOCK + "ln_1.weight", _LAYER + "layer_norm1.weight", "same"),
    (_BLOCK + "ln_1.bias", _LAYER + "layer_norm1.bias", "same"),
    (_BLOCK + "attn.in_proj_weight", _LAYER + "self_attn.{qkv}_proj.weight", "qkv"),
    (_BLOCK + "attn.in_proj_bias", _LAYER + "self_attn.{qkv}_proj.bias", "qkv"),
    (_BLOCK + "attn.out_proj.weight", _LAYER + "self_attn.out_proj.weight", "same"),
    (_BLOCK + "attn.out_proj.bias", _LAYER + "self_attn.out_proj.bias", "same"),
    (_BLOCK + "ln_2.weight", _LAYER + "layer_norm2.weight", "same"),
    (_BLOCK + "ln_2.bias", _LAYER + "layer_norm2.bias", "same"),
    (_BLOCK + "mlp.c_fc.weight", _LAYER + "mlp.fc1.weight", "same"),
    (_BLOCK + "mlp.c_fc.bias", _LAYER + "mlp.fc1.bias", "same"),
    (_BLOCK + "mlp.c_proj.weight", _LAYER + "mlp.fc2.weight", "same"),
    (_BLOCK + "mlp.c_proj.bias", _LAYER + "mlp.fc2.bias", "same"),
    ("ln_final.weight", "final_layer_norm.weight", "same"),
    ("ln_final.bias", "final_layer_norm.bias", "same"),
    ("text_projection", "text_projection.weight", "T"),
)

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
