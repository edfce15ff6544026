"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "KL-f8").

The architecture is LDM's ``diffusionmodules/model.py`` ``Encoder`` / ``Decoder`` wrapped by
``autoencoder.AutoencoderKL``, and the attribute names are its checkpoint keys, so the VAE of an
official single-file checkpoint loads with ``strict=True`` once its ``first_stage_model.`` prefix
is stripped. With ``L = len(channel_mult)`` levels and ``R = num_res_blocks``:

- ``encoder``: ``conv_in``; ``down.i`` = ``R`` ResnetBlocks (``block.j``) and, except at the last
  level, a stride-2 ``downsample``; ``mid`` = ResnetBlock, self-attention, ResnetBlock;
  ``norm_out`` -> SiLU -> ``conv_out`` to ``2 * latent_channels`` (mean and log-variance).
- ``quant_conv`` (1x1) on the moments; ``post_quant_conv`` (1x1) on a latent.
- ``decoder``: ``conv_in``; ``mid``; ``up.i`` for level ``i`` run deepest first, ``R + 1``
  ResnetBlocks and, except at level 0, an ``upsample``; ``norm_out`` -> SiLU -> ``conv_out``.

An image of size ``H x W`` maps to a latent of size ``H / f x W / f`` with ``f = 2**(L - 1)``
(8 for Stable Diffusion). The latents here are *unscaled*: diffusion runs on
``config.scaling_factor * z``, and applying that factor is the pipeline's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unfog.models.vae_tiling import Tiling, tiled_map
from unfog.nn.blocks import Upsample
from unfog.nn.norm import normalization

NORM_GROUPS = 32  # every GroupNorm has 32 groups and eps 1e-6 (LDM ``Normalize``)
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps the encoder's log-variance to this range

Resample = Literal["down", "up"]


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of ``AutoencoderKL``; defaults are the Stable Diffusion VAE (KL-f8).

    Field names follow LDM's ``ddconfig``: ``base_channels`` is ``ch``, ``latent_channels`` is
    both ``z_channels`` and ``embed_dim`` (equal in every released KL autoencoder). The
    encoder always predicts a mean and a log-variance (LDM's ``double_z``, which its
    AutoencoderKL asserts), so there is no switch for it.

    scaling_factor: the constant that brings latents to roughly unit variance before
        diffusion; 0.18215 for SD 1.x / 2.x, 0.13025 for SDXL. It is not stored in the
        single-file checkpoints: it comes from the preset (or a diffusers ``config.json``).
    identity: the identity as the first stage (``PIXEL_SPACE``): latents are the images (LDM's
        f = 1, which the LDM paper calls a pixel-based diffusion model), so a latent model on it
        is a pixel-space model (GLIDE / Imagen) with the whole latent pipeline and trainer.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    scaling_factor: float = 0.18215
    identity: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))  # lists (JSON) -> tuple
        if self.identity and not (self.in_channels == self.out_channels == self.latent_channels
                                  and self.channel_mult == (1,)):
            raise ValueError("the identity first stage keeps the images: in_channels, out_channels and "
                             "latent_channels must be equal and channel_mult (1,) (f = 1), got "
                             f"{self.in_channels}, {self.out_channels}, {self.latent_channels}, {self.channel_mult}")
        for name in ("in_channels", "out_channels", "latent_channels", "base_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        for ch in self.level_channels:
            if ch % NORM_GROUPS:
                raise ValueError(
                    f"channel count {ch} (base_channels={self.base_channels} x channel_mult="
                    f"{self.channel_mult}) is not divisible by the {NORM_GROUPS} GroupNorm groups"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size: ``2**(levels - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)


# Stable Diffusion 1.x and 2.x (CompVis/Stability ``first_stage_config``): KL-f8, 4 channels.
SD_VAE = VAEConfig()
# SDXL: the same layout, retrained weights, a different latent scale. (Its decoder overflows
# in float16; bfloat16 and float32 are fine.)
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
# For tests: two levels (f = 2), about 0.66M parameters.
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)

# Pixel space: the identity first stage on RGB images in [-1, 1], unscaled (GLIDE and Imagen
# diffuse [-1, 1] images directly).
PIXEL_SPACE = VAEConfig(latent_channels=3, base_channels=32, channel_mult=(1,), num_res_blocks=1, scaling_factor=1.0,
                        identity=True)

VAE_PRESETS: dict[str, VAEConfig] = {"SD_VAE": SD_VAE, "SDXL_VAE": SDXL_VAE, "TINY_VAE": TINY_VAE,
                                     "PIXEL_SPACE": PIXEL_SPACE}


def _norm(channels: int) -> nn.GroupNorm:
    return normalization(channels, eps=NORM_EPS, groups=NORM_GROUPS)


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(std^2)), per latent element.

    Built from the moments ``(B, 2C, h, w)``: the first ``C`` channels are the mean, the rest
    the log-variance, clamped to [-30, 20] as in LDM's ``DiagonalGaussianDistribution``.
    """

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps``, eps ~ N(0, I) drawn on the CPU (so a seed gives the same latent
        on every device) from ``generator`` (a CPU generator; None uses the global RNG)."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU generator (noise is drawn on the CPU), got {generator.device}"
            )
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32)  # (B, C, h, w)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)


class ResnetBlock(nn.Module):
    """The autoencoder's residual block (LDM ``ResnetBlock`` with no time embedding).

    ``h = conv2(dropout(silu(norm2(conv1(silu(norm1(x)))))))``; output ``shortcut(x) + h``, where
    the shortcut is a 1x1 conv ``nin_shortcut`` when the channel count changes.
    """

    def __init__(self, channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if out_channels != channels:
            self.nin_shortcut = nn.Conv2d(channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h  # (B, C_out, H, W)


def _pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv applied to pixels laid out as tokens: (B, N, C_in) -> (B, N, C_out)."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels (LDM ``AttnBlock``): ``norm``, then 1x1 conv
    ``q``/``k``/``v``, softmax(q k^T / sqrt(C)) v, 1x1 conv ``proj_out``, residual.

    The 1x1 convs run as matmuls on (B, HW, C) tokens, and attention gets 4-D (B, 1, HW, C)
    inputs with unit stride in C: only then does ``scaled_dot_product_attention`` take its fused
    (flash) CPU kernel. 3-D inputs, or q/k/v as transposed views of (B, C, HW), fall back to the
    math path, which materialises the (B, HW, HW) scores in float32: 1 GiB per image at 1024 px.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, HW, C)
        q, k, v = (_pointwise(proj, tokens)[:, None] for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        h = _pointwise(self.proj_out, h).transpose(1, 2).reshape(b, c, height, width)  # (B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Halve the spatial size: pad right and bottom by one, then a stride-2 3x3 ``conv``.

    (LDM's asymmetric padding; the U-Net's ``nn.blocks.Downsample`` pads symmetrically.)
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H + 1, W + 1)
        return self.conv(x)  # (B, C, H / 2, W / 2)


class MidBlock(nn.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: ResnetBlocks (``block.j``), then a ``downsample`` (encoder), an
    ``upsample`` (decoder) or neither (the encoder's last level, the decoder's level 0)."""

    def __init__(
        self, channels: int, out_channels: int, n_blocks: int, dropout: float, resample: Resample | None
    ):
        super().__init__()
        ins = [channels] + [out_channels] * (n_blocks - 1)
        self.block = nn.ModuleList(ResnetBlock(c, out_channels, dropout) for c in ins)
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)  # (B, C_out, H, W)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C_out, H / 2, W / 2)
        if self.upsample is not None:
            x = self.upsample(x)  # (B, C_out, 2H, 2W)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, last = cfg.level_channels, len(cfg.channel_mult) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        ins = (cfg.base_channels, *chans[:-1])
        self.down = nn.ModuleList(
            Level(c_in, c_out, cfg.num_res_blocks, cfg.dropout, None if i == last else "down")
            for i, (c_in, c_out) in enumerate(zip(ins, chans))
        )
        self.mid = MidBlock(chans[-1], cfg.dropout)
        self.norm_out = _norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, base_channels, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, C_max, H / f, W / f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * latent_channels, H / f, W / f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = cfg.level_channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1], cfg.dropout)
        ins = (*chans[1:], chans[-1])  # level i is fed by level i + 1 (the deepest by the mid block)
        self.up = nn.ModuleList(
            Level(c_in, c_out, cfg.num_res_blocks + 1, cfg.dropout, "up" if i else None)
            for i, (c_in, c_out) in enumerate(zip(ins, chans))
        )
        self.norm_out = _norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_max, h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h * f, w * f)


class AutoencoderKL(nn.Module):
    """The KL autoencoder: ``encode(images) -> DiagonalGaussian`` over unscaled latents, and
    ``decode(latents) -> images``. Images are in [-1, 1].

    Computation runs in the dtype of the weights (``model.to(torch.bfloat16)`` for bf16, or
    autocast); results come back in the dtype of the input.

    tiling: when to split the work into overlapping tiles (``vae_tiling.Tiling``); by default
        images whose longer side exceeds 1024 px, in 512 px tiles with 64 px blended. Set the
        attribute (``vae.tiling = Tiling("always")``) or pass ``tiling=`` to one call.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.tiling = Tiling()
        if config.identity:
            self._build_identity()
            return
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def _build_identity(self) -> None:
        """Encoder and decoder are identities; the 1 x 1 convs are fixed to mean = x, log-variance
        at its floor (std 3e-7), and z -> z: every value is exact in every dtype, and nothing
        trains (their parameters do not require gradients)."""
        z = self.config.latent_channels
        self.encoder, self.decoder = nn.Identity(), nn.Identity()
        self.quant_conv = nn.Conv2d(z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        with torch.no_grad():
            eye = torch.eye(z)[:, :, None, None]
            self.quant_conv.weight.copy_(torch.cat([eye, torch.zeros_like(eye)]))
            self.quant_conv.bias.copy_(torch.cat([torch.zeros(z), torch.full((z,), LOGVAR_RANGE[0])]))
            self.post_quant_conv.weight.copy_(eye)
            self.post_quant_conv.bias.zero_()
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, images: torch.Tensor, tiling: Tiling | None = None) -> DiagonalGaussian:
        """images: (B, in_channels, H, W), H and W divisible by ``config.downsample_factor``.
        Returns the posterior over latents of shape (B, latent_channels, H / f, W / f).
        Large images are encoded in tiles (see ``tiling``); their moments are blended."""
        self._check_images(images)
        f, tiling = self.config.downsample_factor, tiling or self.tiling
        x = images.to(self.dtype)
        if tiling.applies((x.shape[2] // f, x.shape[3] // f), f):
            moments = tiled_map(self._moments, x, tile=tiling.tile, overlap=tiling.overlap, scale_in=f, scale_out=1)
        else:
            moments = self._moments(x)  # (B, 2 * latent_channels, H / f, W / f)
        return DiagonalGaussian(moments.to(images.dtype))

    def decode(self, latents: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
        """latents: (B, latent_channels, h, w), unscaled. Returns (B, out_channels, h * f, w * f).
        Large latents are decoded in tiles (see ``tiling``)."""
        c = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"latents must be (B, {c}, h, w), got {tuple(latents.shape)}")
        f, tiling = self.config.downsample_factor, tiling or self.tiling
        z = latents.to(self.dtype)
        if tiling.applies(tuple(z.shape[2:]), f):
            images = tiled_map(self._decode, z, tile=tiling.tile, overlap=tiling.overlap, scale_in=1, scale_out=f)
        else:
            images = self._decode(z)
        return images.to(latents.dtype)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct ``images`` through a sampled latent."""
        return self.decode(self.encode(images).sample(generator))

    # The two maps of one whole tensor (or one tile), in the model's dtype.
    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, 2 * latent_channels, h, w)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, out_channels, h * f, w * f)

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"images must be (B, {c}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"H and W must be divisible by {f} (2**(levels-1)), got {tuple(images.shape[2:])}"
            )
