"""Attention layers: transformer-style multi-head attention, the DDPM/ADM self-attention block,
and the GEGLU feed-forward. All attention goes through ``F.scaled_dot_product_attention``.

Parameter names follow the official LDM checkpoints (``to_q``/``to_k``/``to_v``/``to_out.0``,
``qkv``/``proj_out``, ``ff.net.0.proj``/``ff.net.2``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unfog.nn.norm import normalization


def resolve_heads(channels: int, num_heads: int | None, num_head_channels: int | None) -> tuple[int, int]:
    """(heads, head_dim) for ``channels``: a fixed head count (SD1) or a fixed head width (SD2/XL).

    Exactly one of ``num_heads`` / ``num_head_channels`` must be given.
    """
    if (num_heads is None) == (num_head_channels is None):
        raise ValueError("give exactly one of num_heads or num_head_channels")
    if num_head_channels is not None:
        if channels % num_head_channels:
            raise ValueError(
                f"{channels} channels are not divisible by num_head_channels={num_head_channels}"
            )
        return channels // num_head_channels, num_head_channels
    if channels % num_heads:
        raise ValueError(f"{channels} channels are not divisible by num_heads={num_heads}")
    return num_heads, channels // num_heads


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# context (B, M, C) -> (context for to_k, context for to_v); see nn/hypernetwork.py
ContextTransform = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context`` (self-attention when it is None).

    LDM ``CrossAttention``: bias-free ``to_q``/``to_k``/``to_v``, then ``to_out.0`` (Linear with
    bias) and ``to_out.1`` (Dropout). Scores are scaled by ``1 / sqrt(head_dim)``.

    ``context_transform`` (None by default) is the one hook for hypernetworks: a callable that
    maps the context (the hidden states in self-attention) to the two contexts ``to_k`` and
    ``to_v`` read; q is untouched. It is a plain attribute, not a submodule, so it never enters
    the state dict.

    ``fuse_projections`` (False by default; ``fuse_projections(module)``) computes the projections
    that read the same input in one matmul: q, k and v in self-attention, k and v in
    cross-attention, with the weights concatenated once and kept until a weight changes (in place,
    moved or replaced). That is one kernel launch instead of three or two. It applies only where it
    is exact: without gradients, without a context transform, and with ``to_q``/``to_k``/``to_v``
    plain ``nn.Linear`` layers (an unmerged LoRA wrapper runs the separate path); not under
    ``torch.compile``, which traces the separate path.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.context_transform: ContextTransform | None = None
        self.fuse_projections = False
        self._fused: tuple[tuple, torch.Tensor] | None = None  # (weights' key, concatenated weight)

    def _fused_weight(self, layers: tuple[nn.Linear, ...]) -> torch.Tensor:
        """The layers' weights concatenated along the output; rebuilt when any of them has changed
        (the key: storage, in-place version, dtype and device of each, as ``nn.lora.AdapterLayer``)."""
        key = tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype, m.weight.device) for m in layers)
        if self._fused is None or self._fused[0] != key:
            self._fused = key, torch.cat([m.weight for m in layers])
        return self._fused[1]

    def _fusable(self) -> bool:
        # Under torch.compile the separate path is traced: the compiler fuses what pays there.
        return (self.fuse_projections and self.context_transform is None and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()
                and all(type(m) is nn.Linear for m in (self.to_q, self.to_k, self.to_v)))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, query_dim); context: (B, M, context_dim) or None (then M = N)
        if self._fusable():
            if context is None:
                q, k, v = F.linear(x, self._fused_weight((self.to_q, self.to_k, self.to_v))).chunk(3, dim=-1)
            else:
                q = self.to_q(x)
                k, v = F.linear(context, self._fused_weight((self.to_k, self.to_v))).chunk(2, dim=-1)
        else:
            self._fused = None  # the copy is not kept while it is not used
            context = x if context is None else context
            context_k = context_v = context
            if self.context_transform is not None:
                context_k, context_v = self.context_transform(context)
            q, k, v = self.to_q(x), self.to_k(context_k), self.to_v(context_v)  # (B, N|M, H*D)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))  # (B, H, N|M, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        return self.to_out(_merge_heads(out))  # (B, N, query_dim)


def fuse_projections(module: nn.Module, enabled: bool = True) -> int:
    """Turn ``CrossAttention.fuse_projections`` on (or off) in every attention layer of ``module``;
    returns how many there are."""
    layers = [m for m in module.modules() if isinstance(m, CrossAttention)]
    for m in layers:
        m.fuse_projections = enabled
        m._fused = None
    return len(layers)


class FusedSelfAttention(nn.Module):
    """ViT-style multi-head self-attention (timm's ``Attention``, as DiT uses it): one ``qkv``
    Linear with bias (dim -> 3 dim, laid out ``[q; k; v]``, each split into heads in order), then
    ``proj``. Scores are scaled by ``1 / sqrt(head_dim)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{dim} channels are not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, N, D) each
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))  # (B, N, dim)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``a * gelu(g)`` with ``[a, g] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # (..., dim_out) each
        if torch.is_grad_enabled():
            return a * F.gelu(gate)
        # Inference: multiply into gelu's output instead of allocating a third (..., dim_out)
        # tensor; this is the widest activation of SD/SDXL (dim_out = 4 x channels).
        return F.gelu(gate).mul_(a)


class FeedForward(nn.Module):
    """Transformer MLP: ``net.0`` GEGLU (dim -> 2*inner), ``net.1`` Dropout, ``net.2`` Linear."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (..., dim)


class AttentionBlock(nn.Module):
    """Spatial self-attention of the DDPM/ADM U-Nets (LDM openaimodel ``AttentionBlock``).

    ``norm`` (GroupNorm) -> ``qkv`` (1x1 Conv1d, C -> 3C) -> attention -> ``proj_out`` (1x1
    Conv1d, zero-initialised) -> residual. The 3C ``qkv`` channels are laid out per head as
    ``[q_h, k_h, v_h]`` (the "legacy" order of LDM/guided-diffusion's ``QKVAttentionLegacy``),
    so their pixel-space checkpoints load unchanged.
    """

    def __init__(self, channels: int, num_heads: int | None = 1, num_head_channels: int | None = None):
        super().__init__()
        self.heads, self.head_dim = resolve_heads(channels, num_heads, num_head_channels)
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(x_flat))  # (B, 3C, T)
        qkv = qkv.reshape(b, self.heads, 3 * self.head_dim, -1).transpose(2, 3)  # (B, H, T, 3D)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # (B, H, T, D) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        h = h.transpose(2, 3).reshape(b, c, -1)  # (B, C, T)
        return (x_flat + self.proj_out(h)).reshape(b, c, *spatial)
