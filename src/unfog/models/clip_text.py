"""CLIP text encoders (Radford et al. 2021): the prompt encoders of Stable Diffusion.

One module serves the three official encoders (see the presets below): OpenAI CLIP ViT-L/14
(SD 1.x, SDXL encoder 1), OpenCLIP ViT-H/14 (SD 2.x) and OpenCLIP ViT-bigG/14 (SDXL encoder 2,
the refiner's only encoder).

Canonical naming. The official files store these networks in two namings. We take the one of the
SD 1.x files (OpenAI CLIP as transformers names it, under ``cond_stage_model.transformer.
text_model.``), which is also the naming of every diffusers/transformers ``text_encoder`` folder,
so two of the three sources load unchanged::

    embeddings.token_embedding.weight           (V, W)
    embeddings.position_embedding.weight        (77, W)
    encoder.layers.{i}.layer_norm1.{weight,bias}
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    encoder.layers.{i}.layer_norm2.{weight,bias}
    encoder.layers.{i}.mlp.fc1 / mlp.fc2        (4W, W) / (W, 4W)
    final_layer_norm.{weight,bias}
    text_projection.weight                      (P, W), only when ``projection_dim`` is set

The OpenCLIP files (SD 2.x ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``)
hold the same network with a fused ``attn.in_proj_weight`` and a raw ``text_projection`` (W, P)
used as ``x @ P``; ``unfog.checkpoint.convert.convert_openclip_text`` maps them to these names.

The network: token + learned position embeddings, then ``layers`` pre-norm transformer layers
``x = x + attn(ln1(x))`` (causal), ``x = x + mlp(ln2(x))``, then ``final_layer_norm``. The
pooled output is the final-normed state of the end-of-text token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import nn

from unfog.choices import check_choice
from unfog.nn.attention import _merge_heads, _split_heads

Activation = Literal["quick_gelu", "gelu"]
Pooling = Literal["argmax", "eos_token"]


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of ``CLIPTextEncoder``; defaults are OpenAI CLIP ViT-L/14 (SD 1.x).

    activation: the MLP non-linearity: "quick_gelu" ``x * sigmoid(1.702 x)`` (OpenAI CLIP) or
        "gelu" (exact, erf-based; OpenCLIP ViT-H and ViT-bigG).
    projection_dim: width of ``text_projection`` (a bias-free Linear applied to the pooled
        output), or None for no projection (the SD 1.x files have none).
    pooling: which position is pooled. "argmax" takes the position of the largest token id, as
        OpenAI CLIP, OpenCLIP and transformers' legacy path (a config whose eos_token_id is 2) do:
        in the official vocabulary the end-of-text token 49407 is the largest id, and argmax
        returns its first occurrence even when the padding is also 49407. "eos_token" takes the
        first position holding ``eos_token_id`` (transformers' path for newer configs). The two
        agree on every sequence that contains an end-of-text token.
    trained_layers: the depth the network was trained with when this module keeps fewer layers
        (``layers``): diffusers' SD 2.x ``text_encoder`` folders and some fine-tunes (Waifu
        Diffusion 1.5) keep 23 of OpenCLIP ViT-H's 24, as SD 2 never reads the last one. "CLIP
        skip" counts from this depth (``depth``), so the same layer is read either way. None:
        the module is the whole network.
    causal: whether a token attends only to itself and earlier tokens, as in every CLIP text
        tower (the default). False lets every token see the whole prompt, as T5 and BERT do: an
        option for a text encoder trained from scratch, where the first noun of "a circle to the
        left of a square" then knows the relation that follows it.
    """

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_positions: int = 77
    mlp_ratio: int = 4
    activation: Activation = "quick_gelu"
    projection_dim: int | None = None
    pooling: Pooling = "argmax"
    eos_token_id: int = 49407
    layer_norm_eps: float = 1e-5
    trained_layers: int | None = None
    causal: bool = True

    @property
    def mlp_width(self) -> int:
        """Hidden width of each layer's MLP."""
        return self.mlp_ratio * self.width

    @property
    def depth(self) -> int:
        """The number of layers of the trained network, of which this module has ``layers``."""
        return self.layers if self.trained_layers is None else self.trained_layers

    def __post_init__(self) -> None:
        for name in ("vocab_size", "width", "layers", "heads", "max_positions", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads={self.heads}")
        if self.activation not in get_args(Activation):
            check_choice("activation", self.activation, get_args(Activation))
        if self.pooling not in get_args(Pooling):
            check_choice("pooling", self.pooling, get_args(Pooling))
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {self.projection_dim}")
        if self.trained_layers is not None and self.trained_layers < self.layers:
            raise ValueError(f"trained_layers ({self.trained_layers}) must be >= layers ({self.layers}) or None")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id {self.eos_token_id} is outside the vocabulary (size {self.vocab_size})"
            )


# OpenAI CLIP ViT-L/14 text tower: SD 1.x and SDXL encoder 1 (their files carry no projection).
CLIP_L = CLIPTextConfig()
# OpenCLIP ViT-H/14 (LAION-2B): SD 2.x. The file carries text_projection, which SD 2 does not use.
OPENCLIP_H = CLIPTextConfig(width=1024, layers=24, heads=16, activation="gelu", projection_dim=1024)
# OpenCLIP ViT-bigG/14 (LAION-2B): SDXL encoder 2; its projected pooled output conditions the U-Net.
OPENCLIP_BIGG = CLIPTextConfig(width=1280, layers=32, heads=20, activation="gelu", projection_dim=1280)
# For tests: the real vocabulary (so real token ids embed), a tiny transformer.
TINY_CLIP = replace(CLIP_L, width=32, layers=2, heads=2)

PRESETS = {"CLIP_L": CLIP_L, "OPENCLIP_H": OPENCLIP_H, "OPENCLIP_BIGG": OPENCLIP_BIGG, "TINY_CLIP": TINY_CLIP}


class CLIPTextOutput(NamedTuple):
    """What the encoder returns.

    last_hidden_state: (B, N, W), the last layer's output after ``final_layer_norm``.
    hidden_states: ``layers + 1`` tensors (B, N, W), not normed: the embeddings, then each layer's
        output. ``hidden_states[-2]`` is the penultimate layer (SDXL uses it as is; SD 2.x and
        "CLIP skip" pass it through ``final_layer_norm``).
    pooled: (B, W), ``last_hidden_state`` at the end-of-text position (see ``pooling``).
    text_embeds: (B, P), ``text_projection(pooled)``; None without a projection.
    """

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    pooled: torch.Tensor
    text_embeds: torch.Tensor | None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        n = input_ids.shape[1]
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (B, N, W)
        return tokens + self.position_embedding.weight[:n]  # (B, N, W)


class LayerShape(Protocol):
    """What a CLIP transformer layer needs from its tower's config (text or vision)."""

    width: int
    heads: int
    activation: Activation
    layer_norm_eps: float

    @property
    def mlp_width(self) -> int: ...


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased ``q_proj``/``k_proj``/``v_proj``/``out_proj``;
    causal (the text tower) or over all positions (the vision tower, ``causal=False``)."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, N, W); mask: (B, 1, N, N) bool, True = may attend; None = causal only (or no mask)
        q = _split_heads(self.q_proj(x), self.heads)  # (B, H, N, D)
        k = _split_heads(self.k_proj(x), self.heads)  # (B, H, N, D)
        v = _split_heads(self.v_proj(x), self.heads)  # (B, H, N, D)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(_merge_heads(out))  # (B, N, W)


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with a hidden width of ``cfg.mlp_width``."""

    def __init__(self, cfg: LayerShape):
        super().__init__()
        self.act = quick_gelu if cfg.activation == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, W)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: LayerShape, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.width, cfg.heads, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))  # (B, N, W)


class CLIPEncoder(nn.Module):
    """The stack of ``layers`` encoder layers (its own module, for the ``encoder.layers`` keys)."""

    def __init__(self, cfg: LayerShape, layers: int, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(layers))


class CLIPTextEncoder(nn.Module):
    """The CLIP text transformer, with an optional projection of the pooled output."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config, config.layers, config.causal)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection: nn.Linear | None = None
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> CLIPTextOutput:
        """input_ids: (B, N) token ids, N <= max_positions; attention_mask: optional (B, N), 1 for
        real tokens and 0 for padding, which then cannot be attended to. With the causal attention
        of CLIP the mask changes only the states at padded positions; Stable Diffusion passes none.
        inputs_embeds: optional (B, N, W) token-embedding rows used instead of looking up
        ``input_ids`` (textual inversion puts its vectors there); the position embeddings are
        added to them, and ``input_ids`` still choose the pooled position."""
        self._check_ids(input_ids)
        if inputs_embeds is not None and inputs_embeds.shape != (*input_ids.shape, self.config.width):
            raise ValueError(f"inputs_embeds must be {(*input_ids.shape, self.config.width)} (the ids' shape and "
                             f"the width), got {tuple(inputs_embeds.shape)}")
        mask = None if attention_mask is None else self._padding_mask(attention_mask)
        x = self.embeddings(input_ids, inputs_embeds)  # (B, N, W)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last = self.final_layer_norm(x)  # (B, N, W)
        batch = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = last[batch, self.eos_positions(input_ids)]  # (B, W)
        text_embeds = None if self.text_projection is None else self.text_projection(pooled)  # (B, P)
        return CLIPTextOutput(last, tuple(hidden_states), pooled, text_embeds)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B,) the position pooled for each sequence (see ``CLIPTextConfig.pooling``).

        ``argmax`` returns the first maximal index, so with padding by the end-of-text token
        (SD 1.x) the first end-of-text token is found.
        """
        if self.config.pooling == "argmax":
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def _padding_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) keep-mask -> (B, 1, N, N) bool: not a padded key (and causal, if the encoder is)."""
        n = attention_mask.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device)  # (N, N)
        if self.config.causal:
            allowed = allowed.tril()
        return allowed & attention_mask.bool()[:, None, None, :]

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the {self.config.max_positions} positions of this "
                "encoder; tokenize with truncation or split the prompt into chunks"
            )
