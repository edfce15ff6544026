"""DiT files -> ``models.dit.DiT``.

Two namings are read, each recognised from its keys:

- the official one of facebookresearch/DiT (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``: a
  plain ``torch.save`` of the state dict, read by the non-executing pickle reader; a training
  checkpoint of that repository, ``{"model", "ema", ...}``, gives its EMA weights where the safe
  reader can read it: the repository's own ones also pickle an ``argparse.Namespace``, which it
  refuses), also as safetensors; these are ``DiT``'s own attribute names;
- diffusers' ``DiTTransformer2DModel`` (``transformer/diffusion_pytorch_model.safetensors``, or
  that folder with its ``config.json``), renamed by ``DIFFUSERS_ROWS``: q, k and v are fused into
  ``qkv``, and the timestep and class embedders, which diffusers copies into every block, are
  read from block 0 (the copies must agree: the official model has one).

The architecture is read off the shapes (width, patch, channels, depth, the position table's
side, learned sigma, classes); the head count is not in the weights, so it comes from the
official sizes (``HEADS_BY_WIDTH``: DiT-S, B, L, XL), a diffusers ``config.json``, unfog's
metadata, or ``num_heads=``.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..models.dit import DiT, DiTConfig
from .io import PICKLE_EXTENSIONS, load_safetensors, load_state_dict, save_safetensors
from .pickle_reader import load_pickle_object

FORMAT = "unfog.dit.v1"
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S, -B, -L, -XL (Peebles & Xie, Table 1)
SENTINEL = "x_embedder.proj.weight"
DIFFUSERS_SENTINEL = "pos_embed.proj.weight"

# diffusers module -> official module (per block: ``{i}``); q/k/v are fused separately.
DIFFUSERS_ROWS = {
    "pos_embed.proj": "x_embedder.proj",
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "transformer_blocks.0.norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
    "transformer_blocks.{i}.norm1.linear": "blocks.{i}.adaLN_modulation.1",
    "transformer_blocks.{i}.attn1.to_out.0": "blocks.{i}.attn.proj",
    "transformer_blocks.{i}.ff.net.0.proj": "blocks.{i}.mlp.fc1",
    "transformer_blocks.{i}.ff.net.2": "blocks.{i}.mlp.fc2",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_SHARED_EMBEDDERS = "norm1.emb."


def _depth(names, prefix: str) -> int:
    blocks = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"the DiT blocks are not numbered 0..N-1: {sorted(blocks)}")
    return len(blocks)


def convert_diffusers_dit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``DiTTransformer2DModel``'s weights in the official naming (without
    ``pos_embed``, which diffusers does not store and ``DiT`` computes)."""
    depth = _depth(state_dict, "transformer_blocks.")
    rules = {}
    for src, dst in DIFFUSERS_ROWS.items():
        for i in range(depth) if "{i}" in src else [None]:
            rules[src.format(i=i)] = dst.format(i=i)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in state_dict.items():
        module, _, leaf = name.rpartition(".")
        if module in rules:
            out[f"{rules[module]}.{leaf}"] = value
        elif _SHARED_EMBEDDERS in name and not module.startswith("transformer_blocks.0."):
            block0 = "transformer_blocks.0." + name.split(".", 2)[2]
            if block0 not in state_dict or not torch.equal(state_dict[block0], value):
                raise ValueError(f"diffusers DiT: {name} differs from block 0's copy; the DiT architecture "
                                 "has one timestep / class embedder, so unfog cannot load per-block ones")
        elif not any(f".attn1.to_{x}." in name for x in "qkv"):
            unknown.append(name)
    for i in range(depth):
        for leaf in ("weight", "bias"):
            parts = [state_dict[f"transformer_blocks.{i}.attn1.to_{x}.{leaf}"] for x in "qkv"]
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts)  # (3D, ...): [q; k; v]
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ValueError(f"{len(unknown)} tensors are not in the diffusers DiT naming: {shown}")
    return out


def dit_config(weights: Mapping[str, torch.Tensor], num_heads: int | None = None, input_size: int | None = None
               ) -> DiTConfig:
    """The ``DiTConfig`` of official-named weights, from their shapes (module docstring)."""
    embed = weights[SENTINEL]  # (D, C, p, p)
    hidden, channels, patch = embed.shape[0], embed.shape[1], embed.shape[2]
    if input_size is None:
        if "pos_embed" not in weights:
            raise ValueError("this DiT file has no pos_embed, so its latent size is unknown: pass input_size=")
        grid = math.isqrt(weights["pos_embed"].shape[1])
        input_size = grid * patch
    if num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            sizes = ", ".join(f"{w} ({h} heads)" for w, h in HEADS_BY_WIDTH.items())
            raise ValueError(f"a DiT of width {hidden} is none of the official sizes ({sizes}); "
                             "its head count is not in the weights: pass num_heads=")
        num_heads = HEADS_BY_WIDTH[hidden]
    out = weights["final_layer.linear.weight"].shape[0] // patch**2
    if out not in (channels, 2 * channels):
        raise ValueError(f"DiT final layer gives {out} channels for {channels} input channels (expected "
                         f"{channels}, or {2 * channels} with learned sigma)")
    table = weights.get("y_embedder.embedding_table.weight")
    cross = weights.get("blocks.0.cross_attn.to_k.weight")
    return DiTConfig(input_size=input_size, patch_size=patch, in_channels=channels, hidden_size=hidden,
                     depth=_depth(weights, "blocks."), num_heads=num_heads,
                     mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                     num_classes=0 if table is None else table.shape[0] - 1, null_class=table is not None,
                     learn_sigma=out == 2 * channels, context_dim=None if cross is None else cross.shape[1])


def _official_weights(tensors: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for wrapper in ("ema", "model", "state_dict"):  # DiT's train.py checkpoints: the EMA weights
        if SENTINEL not in tensors and isinstance(tensors.get(wrapper), Mapping):
            tensors = dict(tensors[wrapper])
    if DIFFUSERS_SENTINEL in tensors:
        return convert_diffusers_dit(tensors)
    if SENTINEL not in tensors:
        raise ValueError(f"{path} is not a DiT file: it has no {SENTINEL!r} (official DiT) or "
                         f"{DIFFUSERS_SENTINEL!r} (diffusers DiTTransformer2DModel) tensor")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def load_dit(path: str | Path, *, num_heads: int | None = None, input_size: int | None = None,
             dtype: torch.dtype = torch.float32) -> DiT:
    """A DiT from an official file, a diffusers transformer file or folder, or one unfog saved.
    ``num_heads`` / ``input_size`` (the latent side) for files that do not tell them."""
    path = Path(path)
    meta: dict[str, Any] = {}
    if path.is_dir():
        config_file = path / "config.json"
        weights_file = path / "diffusion_pytorch_model.safetensors"
        if not weights_file.is_file():
            raise FileNotFoundError(f"{path} has no diffusion_pytorch_model.safetensors (a diffusers DiT transformer folder)")
        tensors, _ = load_safetensors(weights_file)
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            num_heads = num_heads or config.get("num_attention_heads")
            input_size = input_size or config.get("sample_size")
    elif path.suffix.lower() in PICKLE_EXTENSIONS and path.is_file() and zipfile.is_zipfile(path):
        tensors = load_pickle_object(path)  # the whole graph: a training checkpoint nests its weights
        if not isinstance(tensors, dict):
            raise ValueError(f"{path} holds a {type(tensors).__name__}, not a DiT state dict")
    else:
        tensors, meta = load_state_dict(path)
    weights = _official_weights(tensors, path)
    if meta.get("format") == FORMAT:
        config = DiTConfig(**meta["dit"])
    else:
        config = dit_config(weights, num_heads, input_size)
    model = DiT(config)
    if "pos_embed" not in weights:
        weights["pos_embed"] = model.pos_embed
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.to(dtype).eval()


def save_dit(model: DiT, path: str | Path, extra: Mapping[str, Any] = ()) -> None:
    """The official names as safetensors, with the config as metadata (so any size reloads)."""
    save_safetensors(path, model.state_dict(),
                     {"format": FORMAT, "dit": asdict(replace(model.config, gradient_checkpointing=False)), **dict(extra)})
