"""The one configurable U-Net: DDPM/ADM pixel models, SD 1.x / 2.x and SDXL base / refiner.

The architecture is LDM's ``openaimodel.UNetModel`` (Rombach et al. 2022; itself the ADM U-Net
of Dhariwal & Nichol 2021) and the attribute names are its checkpoint keys, so an official
single-file checkpoint loads with ``strict=True`` once its ``model.diffusion_model.`` prefix is
stripped. With ``L = len(channel_mult)`` levels and ``R = num_res_blocks``:

- ``time_embed``: sinusoidal(t) -> Linear -> SiLU -> Linear, width ``4 * model_channels``;
  ``label_emb`` adds a class embedding (int classes) or an MLP of a vector (SDXL "sequential").
- ``input_blocks``: ``0`` is the input conv; then per level ``R`` x [ResBlock (+ attention)]
  and, except at the last level, a Downsample. Every block's output is kept as a skip.
- ``middle_block``: ResBlock, attention, ResBlock.
  (These three are ``UNetEncoder``, which a ControlNet shares: ``models/controlnet.py``.)
- ``output_blocks``: per level, deepest first, ``R + 1`` x [ResBlock on cat(h, skip)
  (+ attention)] and, except at level 0, an Upsample after the last one.
- ``out``: GroupNorm -> SiLU -> 3x3 conv.

"Attention" is a SpatialTransformer with cross-attention to ``context`` when ``context_dim`` is
set (latent text-to-image models), else an AttentionBlock (pixel-space self-attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unfog.nn.attention import AttentionBlock, ContextTransform, CrossAttention, resolve_heads
from unfog.nn.blocks import Downsample, ResBlock, SpatialTransformer, Upsample, zero_
from unfog.nn.embeddings import timestep_embedding
from unfog.nn.norm import normalization
from unfog.nn.token_merging import MergingRun, TokenMerger

NORM_GROUPS = 32  # every GroupNorm in the U-Net has 32 groups (LDM ``normalization``)

ClassConditioning = int | Literal["sequential"] | None


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of ``UNet``; defaults are Stable Diffusion 1.x. See ``presets.py``.

    transformer_depth: per level, the number of transformer layers in each attention module
        of that level; 0 = no attention at that level. SD1 ``(1, 1, 1, 0)``, SDXL ``(0, 2, 10)``.
        Pixel models (``context_dim=None``) use one AttentionBlock, so only 0 or 1 are valid.
    transformer_depth_middle: the same for the middle block (0 = no middle attention).
    num_heads / num_head_channels: exactly one is set: a fixed head count (SD1: 8) or a
        fixed head width (SD2, SDXL: 64) so that wider levels get more heads.
    context_dim: width of the cross-attention context (768 SD1, 1024 SD2, 2048 SDXL);
        None builds a pixel model whose attention is self-attention only.
    use_linear_projection: SpatialTransformer ``proj_in``/``proj_out`` as Linear (SD2, SDXL)
        rather than 1x1 conv (SD1).
    num_classes: None; an int N (``label_emb`` = Embedding(N, 4 * model_channels), y are class
        ids); or "sequential" (SDXL: ``label_emb.0`` = MLP of a y of width ``adm_in_channels``).
    use_scale_shift_norm: ResBlocks apply the embedding as FiLM scale/shift (ADM) not a sum.
    gradient_checkpointing: recompute each block in the backward pass whenever gradients are taken.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int | None = 8
    num_head_channels: int | None = None
    context_dim: int | None = 768
    use_linear_projection: bool = False
    num_classes: ClassConditioning = None
    adm_in_channels: int | None = None
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "transformer_depth", tuple(self.transformer_depth))
        self._check_channels()
        self._check_attention()
        self._check_class_conditioning()

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def cross_attention(self) -> bool:
        return self.context_dim is not None

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def _check_channels(self) -> None:
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        for ch in (self.model_channels, *self.level_channels):
            if ch % NORM_GROUPS:
                raise ValueError(
                    f"channel count {ch} (model_channels={self.model_channels} x channel_mult="
                    f"{self.channel_mult}) is not divisible by the {NORM_GROUPS} GroupNorm groups"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def _check_attention(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries but channel_mult has "
                f"{len(self.channel_mult)} levels; give one depth per level (0 = no attention)"
            )
        depths = (*self.transformer_depth, self.transformer_depth_middle)
        if min(depths) < 0:
            raise ValueError(f"transformer depths must be >= 0, got {depths}")
        if not self.cross_attention and max(depths) > 1:
            raise ValueError(
                f"a model without cross-attention (context_dim=None) has one AttentionBlock per "
                f"attention level, so transformer depths must be 0 or 1, got {depths}"
            )
        if not self.cross_attention and self.use_linear_projection:
            raise ValueError("use_linear_projection needs a SpatialTransformer: set context_dim")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be >= 1 or None, got {self.context_dim}")
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError(
                f"set exactly one of num_heads (fixed head count, SD1) or num_head_channels "
                f"(fixed head width, SD2/SDXL); got num_heads={self.num_heads}, "
                f"num_head_channels={self.num_head_channels}"
            )
        attended = [ch for ch, d in zip(self.level_channels, self.transformer_depth) if d]
        if self.transformer_depth_middle:
            attended.append(self.level_channels[-1])
        for ch in attended:
            resolve_heads(ch, self.num_heads, self.num_head_channels)

    def _check_class_conditioning(self) -> None:
        n = self.num_classes
        if n == "sequential":
            if self.adm_in_channels is None or self.adm_in_channels < 1:
                raise ValueError('num_classes="sequential" needs adm_in_channels (width of the vector y)')
            return
        if self.adm_in_channels is not None:
            raise ValueError(
                f'adm_in_channels is only used with num_classes="sequential", got num_classes={n!r}'
            )
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f'num_classes must be None, an int >= 1 or "sequential", got {n!r}')


class UNetBlock(nn.Sequential):
    """A sequence of layers fed what each needs: ResBlocks get the embedding, SpatialTransformers
    the context, an Upsample the size to reach, the rest only x (LDM ``TimestepEmbedSequential``).
    With ``checkpointing`` each ResBlock, self-attention block and transformer block is recomputed
    in the backward pass (diffusers' granularity); the norms, projections and resamplers of a
    SpatialTransformer and the down / up-sampling layers are not."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        upsample_size: tuple[int, int] | None = None,
        checkpointing: bool = False,
        merging: MergingRun | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = checkpoint(layer, x, emb, use_reentrant=False) if checkpointing else layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = checkpoint(layer, x, use_reentrant=False) if checkpointing else layer(x)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, checkpointing, merging)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def _res_block(cfg: UNetConfig, channels: int, out_channels: int) -> ResBlock:
    return ResBlock(channels, cfg.time_embed_dim, out_channels, cfg.dropout, cfg.use_scale_shift_norm)


def _attention(cfg: UNetConfig, channels: int, depth: int) -> nn.Module:
    """SpatialTransformer (cross-attention models) or AttentionBlock (pixel models)."""
    if not cfg.cross_attention:
        return AttentionBlock(channels, cfg.num_heads, cfg.num_head_channels)
    heads, head_dim = resolve_heads(channels, cfg.num_heads, cfg.num_head_channels)
    return SpatialTransformer(
        channels, heads, head_dim, cfg.context_dim, depth, cfg.dropout, cfg.use_linear_projection
    )


def _stage(cfg: UNetConfig, channels: int, out_channels: int, depth: int) -> list[nn.Module]:
    """ResBlock, followed by attention when ``depth > 0``."""
    layers = [_res_block(cfg, channels, out_channels)]
    if depth:
        layers.append(_attention(cfg, out_channels, depth))
    return layers


def time_embedding(cfg: UNetConfig) -> nn.Sequential:
    """sinusoidal(t) (width ``model_channels``) -> Linear -> SiLU -> Linear (``time_embed_dim``)."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    return nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))


def input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder, and the channel count of each skip it produces."""
    ch = cfg.model_channels
    blocks = [UNetBlock(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
    skips = [ch]
    last = len(cfg.channel_mult) - 1
    for level, (out_ch, depth) in enumerate(zip(cfg.level_channels, cfg.transformer_depth)):
        for _ in range(cfg.num_res_blocks):
            blocks.append(UNetBlock(*_stage(cfg, ch, out_ch, depth)))
            ch = out_ch
            skips.append(ch)
        if level != last:
            blocks.append(UNetBlock(Downsample(ch)))
            skips.append(ch)
    return nn.ModuleList(blocks), skips


def middle_block(cfg: UNetConfig) -> UNetBlock:
    ch = cfg.level_channels[-1]
    layers = _stage(cfg, ch, ch, cfg.transformer_depth_middle)
    return UNetBlock(*layers, _res_block(cfg, ch, ch))


def output_blocks(cfg: UNetConfig, skips: list[int]) -> nn.ModuleList:
    """The decoder; consumes ``skips`` (a copy) from the end, deepest first."""
    skips = list(skips)
    ch = cfg.level_channels[-1]
    blocks = []
    for level in reversed(range(len(cfg.channel_mult))):
        out_ch, depth = cfg.level_channels[level], cfg.transformer_depth[level]
        for i in range(cfg.num_res_blocks + 1):
            layers = _stage(cfg, ch + skips.pop(), out_ch, depth)
            ch = out_ch
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(UNetBlock(*layers))
    return nn.ModuleList(blocks)


def label_embedding(cfg: UNetConfig) -> nn.Module | None:
    ted = cfg.time_embed_dim
    if cfg.num_classes is None:
        return None
    if cfg.num_classes == "sequential":
        mlp = nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        return nn.Sequential(mlp)  # keys label_emb.0.0 / label_emb.0.2
    return nn.Embedding(cfg.num_classes, ted)


class FeatureCache:
    """DeepCache (Ma et al. 2023): between two steps the U-Net's deep features change little, so
    only every ``interval``-th call runs the whole U-Net; the calls in between run the input
    blocks down to skip level ``branch`` (0: the first block alone) and the output blocks from
    there up, reusing the deep features the last full call handed to that output block (before
    its skip concatenation). Interval 1 is the plain U-Net. One cache serves one sampling run;
    a call whose batch or size differs from the cached features' (e.g. CFG truncation halving
    the batch) runs in full and caches anew.

    ``full_above``: calls at a timestep above it all run in full (the first steps, which decide
    the layout); the interval counts from the last of them, so the next ``interval - 1`` calls
    reuse its features. None: the interval counts from the first call."""

    def __init__(self, interval: int, branch: int = 0, full_above: float | None = None):
        if interval < 1:
            raise ValueError(f"DeepCache interval must be >= 1 (1: every step in full), got {interval}")
        if branch < 0:
            raise ValueError(f"DeepCache branch must be >= 0, got {branch}")
        self.interval, self.branch, self.full_above = interval, branch, full_above
        self.calls = 0
        self.features: torch.Tensor | None = None

    def reuse(self, x: torch.Tensor, timesteps: torch.Tensor | float | None = None) -> bool:
        """Whether this call (the next one counted) may run the shallow part alone."""
        if self.full_above is not None and float(torch.as_tensor(timesteps).max()) > self.full_above:
            self.calls = 1  # a full call: the interval counts on from here
            return False
        self.calls += 1
        full = (self.calls - 1) % self.interval == 0
        return not full and self.features is not None and self.features.shape[0] == x.shape[0]


class UNetEncoder(nn.Module):
    """The part of the U-Net that a ControlNet copies: the time (and label) embedding, the input
    blocks and the middle block, built from ``config`` by the builders above, with the embedding,
    the block runner and the input checks that ``UNet`` and ``ControlNet`` share. Attribute names
    are the official keys, so subclasses keep the checkpoint layout."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.time_embed = time_embedding(config)
        self.label_emb = label_embedding(config)
        self.input_blocks, self.skip_channels = input_blocks(config)
        self.middle_block = middle_block(config)

    def embed(
        self, timesteps: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Time embedding plus, for class-conditional models, the label embedding: (B, E)."""
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        t_emb = timestep_embedding(t, self.config.model_channels).to(dtype)  # (B, model_channels)
        emb = self.time_embed(t_emb)  # (B, E)
        if self.config.num_classes == "sequential":
            emb = emb + self.label_emb(y.to(dtype))  # y: (B, adm_in_channels) vectors
        elif self.config.num_classes is not None:
            emb = emb + self.label_emb(y)  # y: (B,) class ids
        return emb

    def run_block(
        self,
        block: UNetBlock,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        upsample_size: tuple[int, int] | None = None,
        merging: MergingRun | None = None,
    ) -> torch.Tensor:
        """One block; its ResBlocks and transformer blocks are recomputed in the backward pass when
        gradient checkpointing is on and gradients are being taken (also in eval mode: a frozen
        U-Net under a trained adapter)."""
        checkpointing = self.config.gradient_checkpointing and torch.is_grad_enabled()
        return block(h, emb, context, upsample_size, checkpointing, merging)

    def check_inputs(self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if cfg.cross_attention and context is None:
            raise ValueError(
                f"this model has cross-attention: pass context of shape (B, M, {cfg.context_dim})"
            )
        if cfg.cross_attention and (context.ndim != 3 or context.shape[-1] != cfg.context_dim):
            raise ValueError(f"context must be (B, M, {cfg.context_dim}), got {tuple(context.shape)}")
        if not cfg.cross_attention and context is not None:
            raise ValueError("this model has no cross-attention (context_dim=None): context must be None")
        self._check_labels(x, y)

    def _check_labels(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        n = self.config.num_classes
        if n is None:
            if y is not None:
                raise ValueError("y was given but this model is not class-conditional (num_classes=None)")
            return
        if y is None:
            raise ValueError(f"this model is class-conditional (num_classes={n!r}): pass y")
        expected = (x.shape[0], self.config.adm_in_channels) if n == "sequential" else (x.shape[0],)
        if tuple(y.shape) != expected:
            raise ValueError(f"y must have shape {expected}, got {tuple(y.shape)}")


class UNet(UNetEncoder):
    """Noise-prediction U-Net: ``forward(x, timesteps, context=None, y=None, control=None)`` ->
    same shape as x with ``out_channels`` channels. The network predicts whatever it was trained
    for (eps, v, x0); turning that into a denoiser is ``unfog.diffusion.denoiser``'s job, not
    this class's.
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        mc = config.model_channels
        self.output_blocks = output_blocks(config, self.skip_channels)
        self.out = nn.Sequential(
            normalization(mc), nn.SiLU(), zero_(nn.Conv2d(mc, config.out_channels, 3, padding=1))
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
        cache: FeatureCache | None = None,
        merger: TokenMerger | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W); timesteps: (B,) or a scalar; context: (B, M, context_dim) for
        cross-attention models; y: (B,) class ids or (B, adm_in_channels) vectors for
        class-conditional models. Returns (B, out_channels, H, W).

        cache: DeepCache's reuse of deep features between calls (``FeatureCache``).
        merger: token merging in the self-attention (ToMe, ``nn.token_merging``).

        control: ControlNet residuals (``models.controlnet``), one per input block then one for
        the middle block (13 for SD 1.x / 2.x, 10 for SDXL), each shaped as the output it joins.
        As in the official ``ControlledUnetModel`` (and diffusers' ``down_block_additional_
        residuals`` / ``mid_block_additional_residual``), the last is added to the middle block's
        output and the others to the skip connections the decoder reads.

        Any H, W work, as in diffusers: each Downsample rounds an odd size up (ceil(H/2)), and
        each Upsample is sized to the skip connection it joins next, so the decoder retraces the
        encoder's sizes (diffusers' ``forward_upsample_size``). When H and W are divisible by
        2**(levels-1) that size is simply twice the input's.
        """
        self.check_inputs(x, context, y)
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(
                f"control must hold {len(self.input_blocks) + 1} residuals ({len(self.input_blocks)} input "
                f"blocks and the middle block), got {len(control)}"
            )
        dtype = self.time_embed[0].weight.dtype
        emb = self.embed(timesteps, x, y, dtype)  # (B, 4 * model_channels)
        context = None if context is None else context.to(dtype)
        h = x.to(dtype)  # (B, C_in, H, W)
        n = len(self.input_blocks)
        if cache is not None and cache.branch >= n:
            raise ValueError(f"DeepCache branch must be < {n} (this U-Net's input blocks), got {cache.branch}")
        reuse = cache is not None and cache.reuse(x, timesteps)
        merging = None if merger is None else merger.start(*x.shape[2:])
        skips = []
        for block in self.input_blocks[: cache.branch + 1 if reuse else n]:
            h = self.run_block(block, h, emb, context, merging=merging)
            skips.append(h)
        if control is not None:
            skips = [_add_residual(s, c, f"control[{i}]") for i, (s, c) in enumerate(zip(skips, control))]
        if not reuse:
            h = self.run_block(self.middle_block, h, emb, context, merging=merging)  # (B, C_max, H/2^(L-1), W/2^(L-1))
            if control is not None:
                h = _add_residual(h, control[-1], f"control[{n}] (the middle block's)")
        first = n - 1 - cache.branch if cache is not None else 0  # the output block the cache feeds
        for i, block in enumerate(self.output_blocks):
            if reuse and i < first:
                continue
            if cache is not None and i == first:
                if reuse:
                    h = cache.features
                else:
                    cache.features = h
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            size = tuple(skips[-1].shape[2:]) if skips else None  # where a closing Upsample must land
            h = self.run_block(block, h, emb, context, size, merging)
        return self.out(h).to(x.dtype)  # (B, C_out, H, W)

    def set_context_transform(self, transform: ContextTransform | None) -> None:
        """Give every attention layer, self and cross, ``transform`` as the map from its context to
        the contexts of ``to_k`` and ``to_v`` (hypernetworks: ``nn.hypernetwork``); None removes it."""
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.context_transform = transform



def _add_residual(h: torch.Tensor, residual: torch.Tensor, what: str) -> torch.Tensor:
    """h + residual; the residual shaped as h, or (B, C, 1, 1) (a globally pooled ControlNet's)."""
    if residual.shape != h.shape and residual.shape != (*h.shape[:2], 1, 1):
        raise ValueError(f"{what} has shape {tuple(residual.shape)}, but the output it joins has {tuple(h.shape)}")
    return h + residual.to(h.dtype)
