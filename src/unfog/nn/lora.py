"""LoRA and LyCORIS adapters: the weight change each stored form means, merging, and the wrappers:
trainable LoRA / LoHa / LoKr layers (``add_lora``) and one that applies loaded adapters (``AdapterLayer``).

Notation: W is the target weight, (out, in) for a Linear or (out, in, kh, kw) for a Conv2d; r the rank;
alpha the stored alpha (missing or 0: alpha = r, as kohya and LyCORIS read it); gamma = alpha / r; m the
user's multiplier. Each kind gives a Delta W shaped like W (gamma included, m not); merging is
W + m * Delta W. Tensor names are the kohya / LyCORIS file suffixes.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3: h = W0 x + B A x):
    down A "lora_down" (r, in) or, on a conv (LoCon), (r, in, kh, kw) with the conv's own kernel;
    up B "lora_up" (out, r) or (out, r, 1, 1).
        Delta W = gamma * (B @ A.flatten(1)).reshape(W.shape)
    CP / Tucker form: A (r, in, 1, 1), M "lora_mid" (r, r, kh, kw), B (out, r, 1, 1):
        Delta W[o, i, y, x] = gamma * sum_pq B[o, p] M[p, q, y, x] A[q, i]
LoHa (LyCORIS: Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation", sec. 3; the Hadamard form is FedPara's): two rank-r products multiplied elementwise,
so the rank of Delta W reaches r^2:
        Delta W = gamma * (W1a @ W1b) * (W2a @ W2b),   Wja "hada_wj_a" (out, r), Wjb (r, in*kh*kw)
    Tucker form on a conv: Wja (r, out), Wjb (r, in), Tj "hada_tj" (r, r, kh, kw), each product being
        (Wj)[o, i, y, x] = sum_pq Tj[p, q, y, x] Wja[p, o] Wjb[q, i]
LoKr (same paper): a Kronecker product, with out = a*b and in = c*d:
        Delta W = gamma * kron(W1, W2)
    W1 "lokr_w1" (a, c), or W1a (a, r) @ W1b (r, c); W2 "lokr_w2" (b, d[, kh, kw]), or W2a (b, r) @
    W2b (r, d*kh*kw), or Tucker W2a (r, b), W2b (r, d), T2 "lokr_t2" (r, r, kh, kw) as in LoHa.
    gamma = alpha / r when a factor is low-rank (r read off W1b, else W2b); with both factors full
    there is no rank and gamma = 1 whatever alpha says (LyCORIS does the same).
DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5) as LyCORIS stores it: a
magnitude s "dora_scale", per output row (out, 1[, 1, 1]) (LyCORIS' default, wd_on_out) or per input
column (1, in[, 1, 1]); the norm of W' = W + Delta W is taken over every other axis:
        W_dora = s * W' / (||W'|| + eps),   merged = W + m * (W_dora - W)
    At m = 1 this is LyCORIS' merge. At other m LyCORIS' modules use W' * (m (s/||W'|| - 1) + 1), which
    keeps the whole Delta W even at m = 0; we interpolate towards W_dora as A1111, ComfyUI and LyCORIS'
    own `functional.apply_dora_scale` do, so m = 0 leaves W unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..choices import check_choice

Kind = Literal["lora", "loha", "lokr"]
KINDS: tuple[str, ...] = get_args(Kind)

_KEYS: dict[str, tuple[str, ...]] = {  # every tensor a kind may hold, required ones first
    "lora": ("lora_down", "lora_up", "lora_mid"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_REQUIRED = {"lora": 2, "loha": 4, "lokr": 0}


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _tucker(t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(r, r, kh, kw) core, (r, out) and (r, in) factors -> (out, in, kh, kw)."""
    return torch.einsum("pq...,po,qi->oi...", t, a, b)


def _fit(delta: Tensor, shape: tuple[int, ...], kind: str) -> Tensor:
    """Delta W in its natural shape -> the weight's shape. Accepted besides equal shapes: a 2-D delta
    for a conv, its columns the flattened (in, kh, kw) (LoHa / LoKr store convs so; a Linear-shaped
    LoRA on a 1x1 conv), and a 1x1 conv delta for a Linear."""
    if tuple(delta.shape) == shape:
        return delta
    flat_ok = delta.dim() == 2 or all(k == 1 for k in delta.shape[2:])
    if flat_ok and len(shape) >= 2 and (delta.shape[0], delta[0].numel()) == (shape[0], math.prod(shape[1:])):
        return delta.reshape(shape)
    raise ValueError(f"{kind} adapter gives Delta W of shape {tuple(delta.shape)}, which cannot fit a weight of "
                     f"shape {shape}")


def _check_lora(s: dict[str, tuple[int, ...]]) -> None:
    down, up, r = s["lora_down"], s["lora_up"], s["lora_down"][0]
    _need(len(down) in (2, 4) and len(up) in (2, 4), f"lora: lora_down {down} and lora_up {up} must be 2-D or 4-D")
    _need(up[1] == r and all(k == 1 for k in up[2:]), f"lora: ranks disagree: lora_down {down} vs lora_up {up}")
    if "lora_mid" in s:
        mid = s["lora_mid"]
        _need(len(mid) == 4 and mid[:2] == (r, r) and all(k == 1 for k in down[2:]),
              f"lora: lora_mid {mid} needs shape ({r}, {r}, kh, kw) and a 1x1 lora_down, got {down}")


def _check_loha(s: dict[str, tuple[int, ...]]) -> None:
    tucker = [k for k in ("hada_t1", "hada_t2") if k in s]
    _need(len(tucker) in (0, 2), f"loha: the Tucker form needs hada_t1 and hada_t2, got only {tucker}")
    r = s["hada_w1_b"][0]
    for j in "12":
        a, b = s[f"hada_w{j}_a"], s[f"hada_w{j}_b"]
        _need(len(a) == 2 and (a[0] if tucker else a[1]) == b[0] == r,
              f"loha: ranks disagree: hada_w{j}_a {a}, hada_w{j}_b {b}, hada_w1_b {s['hada_w1_b']}")
        if tucker:
            tj = s[f"hada_t{j}"]
            _need(len(tj) >= 3 and tj[:2] == (r, r), f"loha: hada_t{j} {tj} needs shape ({r}, {r}, kh, kw)")
    same = [s[f"hada_w{j}_a"] for j in "12"], [s[f"hada_w{j}_b"][1:] for j in "12"], [s.get(k) for k in tucker]
    _need(all(len(set(v)) <= 1 for v in same), f"loha: the two Hadamard halves differ in shape: {s}")


def _check_lokr(s: dict[str, tuple[int, ...]]) -> None:
    for j in "12":
        full, pair = f"lokr_w{j}" in s, [k for k in (f"lokr_w{j}_a", f"lokr_w{j}_b") if k in s]
        got = sorted(k for k in s if k.startswith(f"lokr_w{j}"))
        _need(full != bool(pair) and len(pair) in (0, 2),
              f"lokr: needs lokr_w{j} or lokr_w{j}_a + lokr_w{j}_b, got {got}")
    _need("lokr_t2" not in s or "lokr_w2_a" in s, "lokr: lokr_t2 needs lokr_w2_a and lokr_w2_b, got lokr_w2")
    if "lokr_w1_a" in s:
        a, b = s["lokr_w1_a"], s["lokr_w1_b"]
        _need(len(a) == len(b) == 2 and a[1] == b[0], f"lokr: ranks disagree: lokr_w1_a {a} vs lokr_w1_b {b}")
    if "lokr_w2_a" in s:
        a, b, t = s["lokr_w2_a"], s["lokr_w2_b"], s.get("lokr_t2")
        r = b[0]
        _need(len(a) == 2 and (a[0] if t else a[1]) == r, f"lokr: ranks disagree: lokr_w2_a {a} vs lokr_w2_b {b}")
        _need(t is None or (len(t) >= 3 and t[:2] == (r, r)), f"lokr: lokr_t2 {t} needs shape ({r}, {r}, kh, kw)")
        w1b = s.get("lokr_w1_b", (r,))
        _need(w1b[0] == r, f"lokr: ranks disagree: lokr_w1_b {w1b} vs lokr_w2_b {b}")


_CHECKS = {"lora": _check_lora, "loha": _check_loha, "lokr": _check_lokr}


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter on one module (Linear or Conv2d weight), as a file stores it; see the module docstring."""

    kind: Kind
    tensors: Mapping[str, Tensor]  # kohya / LyCORIS suffix without ".weight" -> tensor
    alpha: float | None = None  # None (or 0): alpha = rank, i.e. scale 1

    def check(self) -> None:
        """ValueError naming what is missing or inconsistent."""
        _need(self.kind in _KEYS, f"unknown adapter kind {self.kind!r}; valid: {', '.join(KINDS)}")
        keys, t = _KEYS[self.kind], self.tensors
        unknown = sorted(set(t) - set(keys) - {"dora_scale"})
        _need(not unknown, f"{self.kind}: unknown tensors {unknown}; valid: {', '.join(keys)}, dora_scale")
        missing = [k for k in keys[: _REQUIRED[self.kind]] if k not in t]
        _need(not missing, f"{self.kind}: missing tensors {missing}; has {sorted(t)}")
        flat = sorted(k for k, v in t.items() if v.dim() < 2 and k != "dora_scale")
        _need(not flat, f"{self.kind}: tensors {flat} must be at least 2-D")
        _CHECKS[self.kind]({k: tuple(v.shape) for k, v in t.items()})

    @property
    def rank(self) -> int:
        """The low-rank dimension r (LoKr with both factors full: 1, as LyCORIS loads it)."""
        self.check()
        t = self.tensors
        key = {"lora": "lora_down", "loha": "hada_w1_b"}.get(self.kind)
        if key is None:  # lokr
            key = "lokr_w1_b" if "lokr_w1_b" in t else "lokr_w2_b" if "lokr_w2_b" in t else None
        return 1 if key is None else int(t[key].shape[0])

    @property
    def scale(self) -> float:
        """gamma = alpha / rank (LoKr with both factors full: 1)."""
        if self.kind == "lokr" and "lokr_w1" in self.tensors and "lokr_w2" in self.tensors:
            return 1.0
        r = self.rank
        return (float(self.alpha) if self.alpha else r) / r

    def delta(self, weight_shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Delta W in float32 shaped like weight_shape, gamma included, the multiplier not."""
        scale, shape = self.scale, tuple(weight_shape)  # scale runs check()
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            down, up = t["lora_down"], t["lora_up"].flatten(1)  # (r, in[, kh, kw]), (out, r)
            if "lora_mid" in t:
                natural = _tucker(t["lora_mid"], up.T, down.flatten(1))  # (out, in, kh, kw)
            else:
                natural = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        elif self.kind == "loha":
            halves = []
            for j in "12":
                a, b = t[f"hada_w{j}_a"], t[f"hada_w{j}_b"]
                if f"hada_t{j}" in t:
                    halves.append(_tucker(t[f"hada_t{j}"], a, b))  # (out, in, kh, kw)
                else:
                    halves.append((a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:]))
            natural = halves[0] * halves[1]
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]  # (a, c)
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])  # (b, d, kh, kw)
            else:
                a, b = t["lokr_w2_a"], t["lokr_w2_b"]
                w2 = (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])  # (b, d*kh*kw) or as stored
            natural = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2.contiguous())
        return _fit(natural * scale, shape, self.kind)


def low_rank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down), float32, with up @ down the best rank-``rank`` approximation of ``delta`` in the
    Frobenius norm (Eckart-Young): the truncated SVD  delta.flatten(1) = U S V^T  ->  U_r S_r V_r^T.
    The rank is capped at min(out, in*kh*kw). The singular values are split evenly,
        up = U_r sqrt(S_r)  (out, r[, 1, 1]),   down = sqrt(S_r) V_r^T  (r, in[, kh, kw]),
    rather than all into up as kohya's extractor does: the product is the same, but the two factors
    then have equal norms (each ||.||_F^2 = sum S_r), so neither is tiny nor huge when stored in
    float16 / bfloat16 or trained further (gradients on both factors at one scale). As a LoRA with
    alpha = r (scale 1): Delta W = up @ down.flatten(1), reshaped like ``delta``."""
    _need(isinstance(rank, int) and rank >= 1, f"LoRA rank must be a positive integer, got {rank!r}")
    _need(delta.dim() in (2, 4), f"can factor a Linear (2-D) or Conv2d (4-D) weight change, got {tuple(delta.shape)}")
    flat = delta.float().flatten(1)  # (out, in*kh*kw)
    r = min(rank, *flat.shape)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)  # (out, k), (k,), (k, in*kh*kw)
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in*kh*kw)
    if delta.dim() == 4:
        up, down = up.reshape(*up.shape, 1, 1), down.reshape(r, *delta.shape[1:])
    return up.contiguous(), down.contiguous()


def _dora_step(w: Tensor, delta: Tensor, magnitude: Tensor, m: float) -> Tensor:
    """m * (W_dora - W) for float32 W and Delta W (module docstring); the norm axis from s's shape."""
    wp, out, inp, tail = w + delta, w.shape[0], w.shape[1], [1] * (w.dim() - 2)
    s = magnitude.to(device=w.device, dtype=torch.float32)
    if s.numel() == out and s.shape[0] == out:  # per output row: norm over (in, kh, kw)
        norm = wp.flatten(1).norm(dim=1).reshape(out, 1, *tail)
    elif s.numel() == inp and s.dim() >= 2 and s.shape[1] == inp:  # per input column: over (out, kh, kw)
        norm = wp.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, inp, *tail)
    else:
        raise ValueError(f"dora_scale of shape {tuple(s.shape)} fits neither ({out}, 1, ...) nor (1, {inp}, ...) "
                         f"for a weight of shape {tuple(w.shape)}")
    w_dora = wp * (s.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))
    return m * (w_dora - w)


def _total_delta(weight: Tensor, adapters: Sequence[tuple[AdapterWeights, float]]) -> Tensor:
    """float32 D with merged = W + D, applying the adapters in order (order matters only for DoRA)."""
    w = weight.float()
    total = torch.zeros_like(w)
    for adapter, m in adapters:
        d = adapter.delta(weight.shape).to(w.device)
        if "dora_scale" in adapter.tensors:
            total = total + _dora_step(w + total, d, adapter.tensors["dora_scale"], float(m))
        else:
            total = total + float(m) * d
    return total


def merged_weight(weight: Tensor, adapters: Sequence[tuple[AdapterWeights, float]]) -> Tensor:
    """weight + sum_i m_i * delta_i computed in float32, returned in weight.dtype (weight itself when
    there are no adapters). An adapter with a dora_scale merges as in the module docstring."""
    if not adapters:
        return weight
    return (weight.float() + _total_delta(weight, adapters)).to(weight.dtype)


class _Wrapped(nn.Module):
    """Base of the wrappers: holds the wrapped nn.Linear / nn.Conv2d's own Parameter objects under its
    names (weight, bias), so the root's state_dict keys stay those of the unwrapped model; the module
    itself is kept aside, unregistered, for `unwrap`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        _need(type(base) in (nn.Linear, nn.Conv2d), f"can wrap only nn.Linear or nn.Conv2d, got {type(base).__name__}")
        mode = getattr(base, "padding_mode", "zeros")
        _need(mode == "zeros", f"can wrap only a zero-padded conv, got padding_mode={mode!r}")
        object.__setattr__(self, "base", base)  # not a submodule: no "base." in state_dict keys
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The wrapped layer's operation with another weight."""
        b = self.base
        if isinstance(b, nn.Linear):
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation, b.groups)

    def extra_repr(self) -> str:
        return f"base={self.base}"

    def unwrap(self) -> nn.Module:
        """The original module, holding this wrapper's (possibly moved) weight and bias."""
        self.base.weight, self.base.bias = self.weight, self.bias
        return self.base


def _tensor(factor: nn.Module | Tensor) -> Tensor:
    """A factor as stored: a LoRA factor is a bias-free Linear / Conv2d (its weight), LoHa's and LoKr's are tensors."""
    return factor.weight if isinstance(factor, nn.Module) else factor


class TrainableLayer(_Wrapped):
    """Base of the trainable adapters around a frozen layer. ``factor_names`` are the trained
    attributes, named as the file names their tensors (``adapter_weights`` maps them one to one), so a
    trainer can hold them elsewhere and bind them back by name. ``alpha`` is a buffer (the file's
    alpha); ``multiplier`` scales the change at forward time. Freezing the base is the caller's business."""

    kind: Kind
    factor_names: tuple[str, ...]

    def __init__(self, base: nn.Module, rank: int, alpha: float, multiplier: float = 1.0):
        super().__init__(base)
        _need(isinstance(rank, int) and rank >= 1, f"{self.kind} rank must be a positive integer, got {rank!r}")
        groups = getattr(base, "groups", 1)
        _need(groups == 1, f"{self.kind} on a grouped conv is not supported (groups={groups})")
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank, self.multiplier = rank, float(multiplier)

    def adapter_weights(self, factors: nn.Module | None = None) -> AdapterWeights:
        """The adapter as a file stores it (detached tensors): this layer's factors, or those that
        ``factors`` holds under the same names (a trainer's copy, e.g. its EMA)."""
        source = self if factors is None else factors
        tensors = {name: _tensor(getattr(source, name)).detach() for name in self.factor_names}
        return AdapterWeights(self.kind, tensors, float(self.alpha))


class LoRALayer(TrainableLayer):
    """Trainable LoRA around a frozen layer: base(x) + multiplier * alpha / rank * up(down(x)). down is
    Kaiming-uniform (a = sqrt(5), as PEFT and kohya), up zero, so the wrapper starts as the identity.
    On a conv, down has the conv's kernel, stride, padding and dilation and up is 1x1. Parameters
    `lora_down.weight`, `lora_up.weight` and an `alpha` buffer: the kohya names."""

    kind = "lora"
    factor_names = ("lora_down", "lora_up")

    def __init__(self, base: nn.Module, rank: int, alpha: float, multiplier: float = 1.0):
        super().__init__(base, rank, alpha, multiplier)
        kw = {"bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, **kw)
            self.lora_up = nn.Linear(rank, base.out_features, **kw)
        else:
            geometry = base.kernel_size, base.stride, base.padding, base.dilation
            self.lora_down = nn.Conv2d(base.in_channels, rank, *geometry, **kw)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.op(x, self.weight, self.bias)
        if self.multiplier == 0:  # switched off (a trainer's base-model pass)
            return y
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the layers cast x themselves
            x = x.to(self.lora_down.weight.dtype)
        h = self.lora_up(self.lora_down(x))
        return y + (h * (self.alpha * (self.multiplier / self.rank))).to(y.dtype)


class _DeltaLayer(TrainableLayer):
    """A trainable adapter applied as a weight: base(x) + op(x, multiplier * Delta W), with Delta W
    built from the factors by ``AdapterWeights.delta`` (the loader's own maths, so what trains is
    what a saved file merges into). Building Delta W each step costs an (out, in*kh*kw) tensor per
    layer, which is nothing for the models trained here; LyCORIS' bypass mode avoids it for large ones."""

    def _param(self, name: str, *shape: int) -> None:
        w = self.weight
        setattr(self, name, nn.Parameter(torch.empty(shape, device=w.device, dtype=w.dtype)))

    def delta(self) -> Tensor:
        """Delta W shaped like the weight, float32, alpha / rank included, multiplier not; differentiable."""
        tensors = {name: getattr(self, name) for name in self.factor_names}
        return AdapterWeights(self.kind, tensors, float(self.alpha)).delta(self.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        y = self.op(x, self.weight, self.bias)
        if self.multiplier == 0:  # switched off (a trainer's base-model pass)
            return y
        d = self.delta()
        return y + self.op(x.to(d.dtype), d * self.multiplier).to(y.dtype)


def _flat_in(base: nn.Module) -> int:
    """in * kh * kw: the columns of a weight flattened to 2-D."""
    return base.weight[0].numel()


class LoHaLayer(_DeltaLayer):
    """Trainable LoHa (module docstring): Delta W = alpha / rank * (W1a @ W1b) * (W2a @ W2b), the
    parametrisation of LyCORIS' LohaModule without Tucker (its default, use_tucker=False): W1a, W2a
    (out, r), W1b, W2b (r, in*kh*kw), a conv's kernel flattened into the columns. Initialised as
    LyCORIS does: W1a ~ N(0, 0.1^2), W1b, W2b ~ N(0, 1) and W2a = 0, so Delta W starts at 0 and the
    first step moves W2a alone (the other factors' gradients carry the factor W2a @ W2b = 0)."""

    kind = "loha"
    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base: nn.Module, rank: int, alpha: float, multiplier: float = 1.0):
        super().__init__(base, rank, alpha, multiplier)
        out, flat_in = self.weight.shape[0], _flat_in(base)
        for j in "12":
            self._param(f"hada_w{j}_a", out, rank)
            self._param(f"hada_w{j}_b", rank, flat_in)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)


def factorization(dim: int) -> tuple[int, int]:
    """(m, n) with m * n = dim, m <= n and m + n smallest: m is the largest divisor of dim up to
    sqrt(dim). This is LyCORIS' ``factorization(dim, factor=-1)``, its default: 128 -> (8, 16),
    64 -> (8, 8), 127 -> (1, 127)."""
    m = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0)
    return m, dim // m


class LoKrLayer(_DeltaLayer):
    """Trainable LoKr (module docstring): Delta W = gamma * kron(W1, W2), laid out as LyCORIS'
    LokrModule with its defaults (factor=-1, decompose_both=False, use_tucker=False, full_matrix=False):
    out = a * b and in = c * d by ``factorization`` (a <= b, c <= d); W1 "lokr_w1" (a, c) is always
    full; W2 is low-rank, "lokr_w2_a" (b, r) @ "lokr_w2_b" (r, d*kh*kw) (a conv's kernel flattened
    into the columns), when rank < max(b, d) / 2, else full "lokr_w2" (b, d[, kh, kw]).
    gamma = alpha / rank with a low-rank W2; with W2 full there is no rank, gamma = 1 and the stored
    alpha is the rank (LyCORIS sets alpha = lora_dim there). Initialised as LyCORIS does: W1 and
    W2a Kaiming-uniform (a = sqrt(5)), W2b (or a full W2) zero, so Delta W starts at 0."""

    kind = "lokr"

    def __init__(self, base: nn.Module, rank: int, alpha: float, multiplier: float = 1.0):
        super().__init__(base, rank, alpha, multiplier)
        w = self.weight
        (a, b), (c, d), kernel = factorization(w.shape[0]), factorization(w.shape[1]), tuple(w.shape[2:])
        low_rank = rank < max(b, d) / 2
        if not low_rank:
            self.alpha = torch.tensor(float(rank))  # the buffer: gamma = 1
        self._param("lokr_w1", a, c)
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if low_rank:
            self.factor_names = ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
            self._param("lokr_w2_a", b, rank)
            self._param("lokr_w2_b", rank, d * math.prod(kernel))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w2_b)
        else:
            self.factor_names = ("lokr_w1", "lokr_w2")
            self._param("lokr_w2", b, d, *kernel)
            nn.init.zeros_(self.lokr_w2)


TRAINABLE: dict[str, type[TrainableLayer]] = {"lora": LoRALayer, "loha": LoHaLayer, "lokr": LoKrLayer}


class AdapterLayer(_Wrapped):
    """Applies (AdapterWeights, multiplier) pairs at forward time without touching the base weights:
    forward = the layer's op with merged_weight(weight, adapters). The merged weight is cached and
    rebuilt when the adapters change or the base weight is changed in place or moved."""

    def __init__(self, base: nn.Module, adapters: Sequence[tuple[AdapterWeights, float]] = ()):
        super().__init__(base)
        self.set_adapters(adapters)

    def set_adapters(self, adapters: Sequence[tuple[AdapterWeights, float]]) -> None:
        """Replace the adapters; merges now, so a bad adapter fails here (and changes nothing)."""
        adapters = tuple(adapters)
        self._cache = self._merge(adapters)
        self.adapters = adapters

    def _merge(self, adapters: tuple[tuple[AdapterWeights, float], ...]) -> tuple[tuple, Tensor]:
        w = self.weight
        with torch.no_grad():  # the key: _version counts in-place changes of the weight
            return (w.data_ptr(), w._version, w.dtype, w.device), merged_weight(w, adapters)

    def _merged(self) -> Tensor:
        w = self.weight
        if self._cache[0] != (w.data_ptr(), w._version, w.dtype, w.device):
            self._cache = self._merge(self.adapters)
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x, self._merged() if self.adapters else self.weight, self.bias)


def _wrap(root: nn.Module, names: Sequence[str], make) -> dict[str, _Wrapped]:
    _need(len(set(names)) == len(names), f"duplicate module names in {list(names)}")
    wrappers = {}
    for name in names:  # build all first: a bad name leaves root untouched
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"no submodule {name!r} in {type(root).__name__}") from None
        _need(name != "" and not isinstance(module, _Wrapped), f"{name!r}: cannot wrap the root or a wrapped module")
        wrappers[name] = make(module)
    for name, wrapper in wrappers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent), leaf, wrapper)
    return wrappers


def add_lora(root: nn.Module, names: Sequence[str], rank: int, alpha: float,
             algo: Kind = "lora") -> dict[str, TrainableLayer]:
    """Replace each named submodule (dotted path) of root by a trainable adapter around it:
    ``algo`` "lora" (LoRALayer), "loha" (LoHaLayer) or "lokr" (LoKrLayer), as LyCORIS' ``algo``."""
    check_choice("adapter algo", algo, TRAINABLE)
    return _wrap(root, names, lambda m: TRAINABLE[algo](m, rank, alpha))


def add_adapter_layers(root: nn.Module, names: Sequence[str]) -> dict[str, AdapterLayer]:
    """Replace each named submodule of root by an AdapterLayer (no adapters yet: see set_adapters)."""
    return _wrap(root, names, AdapterLayer)


def remove_lora(root: nn.Module) -> None:
    """Put back the original module of every wrapper (a TrainableLayer or AdapterLayer) under root."""
    for name, module in list(root.named_modules()):
        if isinstance(module, _Wrapped) and name:
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent), leaf, module.unwrap())
