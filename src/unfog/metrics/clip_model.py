"""CLIP (Radford et al. 2021), both towers: the image-text model behind the CLIP score.

The text tower is ``unfog.models.clip_text.CLIPTextEncoder``; this module adds the vision
transformer (ViT, Dosovitskiy et al. 2021), the two projections into the joint space and the
learned temperature. Names are those of transformers' ``CLIPModel``, the layout of a "CLIP model
folder" on the hub (``openai/clip-vit-large-patch14`` and friends)::

    text_model.{embeddings,encoder,final_layer_norm}.*    as CLIPTextEncoder, no projection inside
    vision_model.embeddings.patch_embedding.weight      (W, 3, P, P)  conv, stride P, no bias
    vision_model.embeddings.class_embedding             (W,)
    vision_model.embeddings.position_embedding.weight   (1 + (S/P)^2, W)
    vision_model.pre_layrnorm.{weight,bias}             (W,)   [sic: transformers' spelling]
    vision_model.encoder.layers.{i}.*                   as the text layers, attention not causal
    vision_model.post_layernorm.{weight,bias}           (W,)   applied to the class token only
    visual_projection.weight                            (E, W) no bias
    text_projection.weight                              (E, W_text) no bias
    logit_scale                                         ()     log of the softmax temperature's inverse

OpenCLIP files (``visual.conv1.weight``, fused ``in_proj_weight``, raw ``proj`` matrices) convert
with ``unfog.checkpoint.convert.convert_openclip_clip``.

The vision tower: cut the (B, 3, S, S) image into (S/P)^2 patches, embed each by the conv,
prepend the class embedding, add position embeddings, LayerNorm ("pre"), run the pre-norm
transformer layers without a mask, LayerNorm ("post") the class token's state, project.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from unfog.choices import check_choice
from unfog.models.clip_text import Activation, CLIPEncoder, CLIPTextConfig, CLIPTextEncoder

# Constant position-id buffers that older transformers CLIPModel files carry; not weights.
CLIP_IGNORED = frozenset({
    "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids",
})


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of the ViT image tower; defaults are OpenAI CLIP ViT-L/14.

    image_size: S, the side of the square input (224 for the common models).
    patch_size: P; S must be a multiple of it. mlp_width: hidden width of each layer's MLP
        (4 W for the OpenAI models; OpenCLIP's bigG and g use other ratios, hence a width).
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "mlp_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads={self.heads}")
        if self.activation not in get_args(Activation):
            check_choice("activation", self.activation, get_args(Activation))

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: 1 + (S / P)^2."""
        return 1 + (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the width ``projection_dim`` of the joint embedding space.
    ``text.projection_dim`` must be None: the text projection is a top-level ``text_projection``."""

    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 768

    def __post_init__(self) -> None:
        if self.text.projection_dim is not None:
            raise ValueError("text.projection_dim must be None; CLIPConfig.projection_dim sets the joint width")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}")


# OpenAI CLIP ViT-L/14 (openai/clip-vit-large-patch14), torchmetrics' default for the CLIP score.
CLIP_VIT_L14 = CLIPConfig()
# OpenAI CLIP ViT-B/32 and ViT-B/16 (openai/clip-vit-base-patch32, -patch16).
_TEXT_B = CLIPTextConfig(width=512, heads=8)
CLIP_VIT_B32 = CLIPConfig(_TEXT_B, CLIPVisionConfig(patch_size=32, width=768, layers=12, heads=12, mlp_width=3072), 512)
CLIP_VIT_B16 = CLIPConfig(_TEXT_B, replace(CLIP_VIT_B32.vision, patch_size=16), 512)
# For tests.
TINY_CLIP_MODEL = CLIPConfig(
    CLIPTextConfig(vocab_size=49408, width=32, layers=2, heads=2),
    CLIPVisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_width=64),
    projection_dim=16,
)
PRESETS = {"CLIP_VIT_L14": CLIP_VIT_L14, "CLIP_VIT_B32": CLIP_VIT_B32, "CLIP_VIT_B16": CLIP_VIT_B16,
           "TINY_CLIP_MODEL": TINY_CLIP_MODEL}


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding, a prepended class embedding, learned position embeddings."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, W)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + N, W)


class CLIPVisionTransformer(nn.Module):
    """The ViT tower: (B, 3, S, S) normalised pixels -> (B, W) post-normed class token state."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, cfg.layers, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}; "
                             "see unfog.metrics.clip_score.clip_preprocess")
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + N, W)
        for layer in self.encoder.layers:
            x = layer(x, None)
        return self.post_layernorm(x[:, 0])  # (B, W)


class CLIPOutput(NamedTuple):
    """``image_embeds`` (B_i, E) and ``text_embeds`` (B_t, E), unit length; ``logits_per_image``
    (B_i, B_t) = exp(logit_scale) * cosine similarities; ``logits_per_text`` is its transpose."""

    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class CLIPModel(nn.Module):
    """Both CLIP towers with their projections and temperature (transformers' names)."""

    def __init__(self, config: CLIPConfig = CLIP_VIT_L14):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextEncoder(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.visual_projection = nn.Linear(config.vision.width, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, E) image embeddings, not normalised."""
        dtype = self.visual_projection.weight.dtype
        return self.visual_projection(self.vision_model(pixel_values.to(dtype)))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) token ids -> (B, E) text embeddings, not normalised."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooled)

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> CLIPOutput:
        image = F.normalize(self.encode_image(pixel_values), dim=-1)  # (B_i, E)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)  # (B_t, E)
        logits_per_text = self.logit_scale.exp() * text @ image.T  # (B_t, B_i)
        return CLIPOutput(logits_per_text.T, logits_per_text, image, text)


# ---------------------------------------------------------------------------------------------
# Configs and weights from files.


def clip_config_from_transformers(c: dict) -> CLIPConfig:
    """Our config for a transformers ``CLIPConfig`` config.json (``text_config``, ``vision_config``,
    ``projection_dim``). Missing entries take transformers' defaults (ViT-B/32)."""
    from unfog.checkpoint.diffusers_folder import clip_config_from_transformers as text_config

    # early transformers versions wrote the towers' configs as *_config_dict
    v, t = c.get("vision_config") or c.get("vision_config_dict"), c.get("text_config") or c.get("text_config_dict")
    if v is None or t is None:
        raise ValueError("not a transformers CLIPModel config.json: it needs text_config and vision_config")
    width = v.get("hidden_size", 768)
    vision = CLIPVisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        width=width,
        layers=v.get("num_hidden_layers", 12),
        heads=v.get("num_attention_heads", 12),
        mlp_width=v.get("intermediate_size", 4 * width),
        activation=v.get("hidden_act", "quick_gelu"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
    )
    t = {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, **t}
    return CLIPConfig(text_config(t, has_projection=False), vision, c.get("projection_dim", 512))


def canonical_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP model in transformers' naming (already ours; position-id buffers dropped) or in
    OpenCLIP's (``visual.conv1.weight`` present; converted)."""
    from unfog.checkpoint.convert import convert_openclip_clip

    if "visual.conv1.weight" in state_dict:
        return convert_openclip_clip(state_dict)
    if "vision_model.embeddings.patch_embedding.weight" in state_dict:
        return {k: v for k, v in state_dict.items() if k not in CLIP_IGNORED}
    raise ValueError("not a CLIP model in a known naming: expected vision_model.embeddings.patch_embedding.weight "
                     "(transformers) or visual.conv1.weight (OpenCLIP)")


_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def weights_help() -> str:
    """Where to get CLIP weights: the text of every error about a missing model."""
    return ("unfog downloads nothing; download a transformers CLIP model folder, e.g. the Hugging Face "
            "repository openai/clip-vit-large-patch14 (config.json + model.safetensors; the model of "
            "torchmetrics' CLIP score), and pass the folder")


def load_clip_model(
    path: str | Path,
    config: CLIPConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CLIPModel:
    """A CLIP model in eval mode, gradients off, from a transformers folder (``config.json`` and
    ``model.safetensors`` or ``pytorch_model.bin``; ``config`` then defaults to the folder's) or a
    single file in transformers or OpenCLIP naming (``config`` required: OpenCLIP files carry
    none). Names and shapes are checked strictly."""
    from unfog.checkpoint.io import load_state_dict

    path = Path(path)
    if path.is_dir():
        if config is None:
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} has no config.json; is it a transformers CLIP model folder?")
            config = clip_config_from_transformers(json.loads((path / "config.json").read_text()))
        files = [path / name for name in _FOLDER_WEIGHTS if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{path} holds none of {', '.join(_FOLDER_WEIGHTS)}")
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"CLIP model not found: {path}. {weights_help()}")
    elif config is None:
        raise ValueError(f"{path}: a single CLIP file carries no config; pass config= (e.g. CLIP_VIT_L14)")
    tensors, _ = load_state_dict(path)
    model = CLIPModel(config)
    model.load_state_dict(canonical_clip(tensors), strict=True)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()
