"""DiT: the diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with
Transformers"), a drop-in for the U-Net on latents.

    x (B, C, H, W) --patchify p x p--> tokens (B, T, D) + fixed 2-D sin-cos positions, T = HW / p^2
    c = t_embedder(t) [+ y_embedder(class)]                       (B, D): the conditioning vector
    N x block:  (shift, scale, gate) x 2 = adaLN_modulation(c)     adaLN-Zero (sec. 3.2)
                x += gate1 * attn(norm1(x) * (1 + scale1) + shift1)
                [x += cross_attn(norm_cross(x), context)]            optional text tokens (PixArt-alpha)
                x += gate2 * mlp(norm2(x) * (1 + scale2) + shift2)
    final: norm(x) * (1 + scale) + shift -> linear -> unpatchify  (B, C_out, H, W)

C_out is 2C when the model learns its variance (``learn_sigma``, as the official ImageNet models
do; the first C channels are eps, the rest the interpolation v of the variance, Nichol &
Dhariwal 2021 eq. 15). Every modulation and the final layer start at zero, so a fresh block is
the identity and a fresh model predicts 0.

Attribute names are the official checkpoint keys of facebookresearch/DiT (``x_embedder.proj``,
``t_embedder.mlp.0``, ``y_embedder.embedding_table``, ``blocks.N.attn.qkv``,
``blocks.N.adaLN_modulation.1``, ``final_layer.linear``, ``pos_embed``), so those files load
with ``strict=True``. The timestep embedding is the official one (frequencies
``exp(-ln(10^4) i / 128)``); diffusers' ``DiTTransformer2DModel`` divides by 127 instead
(``downscale_freq_shift=1``), so its outputs for the official weights differ slightly from the
reference implementation's and ours (docs/dit.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unfog.nn.attention import CrossAttention, FusedSelfAttention
from unfog.nn.embeddings import timestep_embedding

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features


@dataclass(frozen=True)
class DiTConfig:
    """One DiT. ``input_size`` is the latent side the model was trained at (the position table
    is fixed to it); ``num_classes`` 0 for a model without class labels; ``null_class`` adds the
    row ``num_classes`` that classifier-free guidance uses as "no class" (the official models
    train with 10% label dropout and have it); ``context_dim`` adds a cross-attention on text
    tokens to every block."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    null_class: bool = True
    learn_sigma: bool = True
    context_dim: int | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiT {name} must be >= 1, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"DiT hidden_size {self.hidden_size} must split into {self.num_heads} heads of even width")
        if self.hidden_size % 4:
            raise ValueError(f"DiT hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos positions)")
        if self.num_classes < 0:
            raise ValueError(f"DiT num_classes must be >= 0, got {self.num_classes}")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"DiT context_dim must be >= 1 or None, got {self.context_dim}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size


# The official ImageNet models (facebookresearch/DiT): DiT-XL/2 on 256 px (32 x 32 latents) and 512 px.
DIT_XL_2_256 = DiTConfig(input_size=32)
DIT_XL_2_512 = DiTConfig(input_size=64)
# Text-conditional DiT for the `shapes` latents (64 px images, 16 x 16 x 4 latents): 64 tokens of
# width 256, 6 blocks with cross-attention on the text encoder's 128-wide tokens, no classes: 8.5M
# parameters and 2.3 GFLOP per training sample, against the SHAPES U-Net's 6.7M and 2.0. The
# trainer sets in_channels, input_size and context_dim from the autoencoder and the encoder.
DIT_SHAPES = DiTConfig(input_size=16, patch_size=2, hidden_size=256, depth=6, num_heads=8, num_classes=0,
                       null_class=False, learn_sigma=False, context_dim=128)
DIT_TINY = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=0,
                     null_class=False, learn_sigma=False, context_dim=32)


def sincos_positions(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D positional table, (grid^2, dim) float32, tokens in row-major order: the
    first dim/2 channels encode the column, the rest the row, each as ``[sin(p w), cos(p w)]``
    with ``w_i = 10000^(-i / (dim / 4))``."""
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(p: Tensor) -> Tensor:  # (grid^2,) -> (grid^2, dim/2)
        a = p.reshape(-1, 1) * w[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, T, D) * (1 + scale) + shift, with shift and scale (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (256) -> Linear -> SiLU -> Linear (D)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_DIM).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, rows: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, hidden)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, timm's ``Mlp`` as DiT builds it."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _adaln(hidden: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(D, chunks * D), zero-initialised: adaLN-Zero's modulation."""
    layer = nn.Linear(hidden, chunks * hidden)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return nn.Sequential(nn.SiLU(), layer)


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = FusedSelfAttention(d, config.num_heads)
        if config.context_dim is not None:
            self.norm_cross = nn.LayerNorm(d, eps=1e-6)
            self.cross_attn = CrossAttention(d, config.context_dim, config.num_heads, d // config.num_heads)
            nn.init.zeros_(self.cross_attn.to_out[0].weight)  # a fresh cross-attention adds nothing
            nn.init.zeros_(self.cross_attn.to_out[0].bias)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * config.mlp_ratio))
        self.adaLN_modulation = _adaln(d, 6)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        # x: (B, T, D); c: (B, D); context: (B, M, context_dim) or None
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, config.patch_size**2 * config.out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = _adaln(d, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p * p * C_out)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, HW / p^2, D): a p x p convolution with stride p, tokens row-major."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    """The diffusion transformer (module docstring). Call ``(x, timesteps, context=None, y=None)``
    as the U-Net: x (B, C, H, W) at the config's input size, timesteps (B,), ``context`` text
    tokens (B, M, context_dim) for a model with cross-attention, ``y`` class labels (B,) int64 for
    a class-conditional one (the null class, ``num_classes``, for the unconditional pass).
    Returns (B, C_out, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(d)
        if config.num_classes:
            self.y_embedder = LabelEmbedder(config.num_classes + config.null_class, d)
        # A buffer, not a parameter (the official file stores it, and it never trains).
        self.register_buffer("pos_embed", sincos_positions(d, config.grid)[None])
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        self._check_inputs(x, context, y)
        cfg = self.config
        b, dtype = x.shape[0], self.pos_embed.dtype
        tokens = self.x_embedder(x.to(dtype)) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(timesteps.expand(b))  # (B, D)
        if cfg.num_classes:
            c = c + self.y_embedder(y)
        context = None if context is None else context.to(dtype)
        use_checkpoint = cfg.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = (checkpoint(block, tokens, c, context, use_reentrant=False) if use_checkpoint
                      else block(tokens, c, context))
        return self.unpatchify(self.final_layer(tokens, c))

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, T, p * p * C) -> (B, C, H, W): token (i, j)'s p x p patch, channels last."""
        cfg, b = self.config, tokens.shape[0]
        g, p, c = cfg.grid, cfg.patch_size, cfg.out_channels
        x = tokens.reshape(b, g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # (B, C, g, p, g, p) -> image

    def _check_inputs(self, x: Tensor, context: Tensor | None, y: Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2:] != (cfg.input_size, cfg.input_size):
            raise ValueError(f"this DiT takes ({cfg.in_channels}, {cfg.input_size}, {cfg.input_size}) latents "
                             f"(its position table is fixed to that size), got {tuple(x.shape[1:])}")
        if (context is None) != (cfg.context_dim is None):
            raise ValueError("this DiT " + ("takes text tokens (context)" if cfg.context_dim else
                                            "has no cross-attention: give no context"))
        if (y is None) != (cfg.num_classes == 0):
            raise ValueError(f"this DiT takes class labels 0..{cfg.num_classes - 1} (y)" if cfg.num_classes
                             else "this DiT has no class labels: give no y")
