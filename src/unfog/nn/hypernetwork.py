"""Hypernetworks (NovelAI, 2022; AUTOMATIC1111's ``modules/hypernetworks``): small residual MLPs
that transform the context of attention before its key and value projections.

For every attention layer whose context is ``C`` wide, a hypernetwork holds a pair of modules
``(h_k, h_v)`` for that width, and the layer computes

    k = to_k(c + h_k(c) * m),    v = to_v(c + h_v(c) * m),    q = to_q(x) unchanged

with ``m`` the multiplier (A1111's "strength"). In self-attention the context is the hidden states
themselves, so a file's pairs for 320 / 640 / 1280 act on SD's self-attention and its pair for 768
(SD1) or 1024 (SD2) on the cross-attention to the text. Several hypernetworks chain: each
transforms the k and v contexts the previous one produced.

Each ``h`` is A1111's ``HypernetworkModule.linear``, an ``nn.Sequential`` whose indices are the
file's keys: for ``i`` in ``0 .. len(layer_structure) - 2``,

    Linear(C * ls[i] -> C * ls[i+1])
    activation         (unless "linear"; after the last Linear only with ``activate_output``)
    LayerNorm          (with ``layer_norm``; after every Linear, the last one too)
    Dropout(p)         (where ``dropout_structure[i+1] > 0``; a no-op at inference, but it takes
                        an index, so it decides the key names)

The option names and defaults of the files are in ``checkpoint/hypernetwork.py`` and
docs/hypernetworks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The activations A1111 offers that act element-wise and need no arguments: its seven named
# ones ("swish" is Hardswish there) and torch.nn's other parameter-free-to-build classes under
# their lower-case class names. Left out: glu (halves the width, so no file can use it), softmax,
# softmin, logsoftmax and softmax2d (normalise over the batch for (B, M, C) input), threshold and
# multiheadattention (A1111 cannot build them without arguments).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "celu": nn.CELU, "gelu": nn.GELU, "hardshrink": nn.Hardshrink,
    "hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish, "hardtanh": nn.Hardtanh,
    "logsigmoid": nn.LogSigmoid, "mish": nn.Mish, "prelu": nn.PReLU, "relu6": nn.ReLU6, "rrelu": nn.RReLU,
    "selu": nn.SELU, "silu": nn.SiLU, "softplus": nn.Softplus, "softshrink": nn.Softshrink,
    "softsign": nn.Softsign, "tanhshrink": nn.Tanhshrink,
}
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


@dataclass(frozen=True)
class HypernetworkOptions:
    """The shape of every module of a hypernetwork (A1111's file keys in brackets).

    layer_structure: widths as multiples of C, starting and ending with 1 [``layer_structure``].
    activation: a name in ``ACTIVATIONS`` [``activation_func``; None there means "linear"].
    layer_norm: a LayerNorm after each Linear's activation [``is_layer_norm``].
    dropout_structure: dropout probability after Linear ``i`` at entry ``i + 1``; at least
        ``len(layer_structure)`` entries, each in [0, 1) [``dropout_structure``].
    activate_output: the activation after the last Linear too [``activate_output``].
    weight_init: how training initialises the Linears [``weight_initialization``]; ``initialize_``.
    """

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = "linear"
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)
    activate_output: bool = False
    weight_init: str = "Normal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_structure", tuple(float(x) for x in self.layer_structure))
        object.__setattr__(self, "dropout_structure", tuple(float(x) for x in self.dropout_structure))
        ls, ds = self.layer_structure, self.dropout_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or min(ls) <= 0:
            raise ValueError(f"layer_structure must start and end with 1 and hold positive widths, got {list(ls)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown hypernetwork activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if len(ds) < len(ls) or not all(0 <= p < 1 for p in ds):
            raise ValueError(f"dropout_structure needs {len(ls)} probabilities in [0, 1) (one per entry of "
                             f"layer_structure {list(ls)}), got {list(ds)}")

    def widths(self, dim: int) -> list[int]:
        """The feature widths through a module for context width ``dim`` (A1111 truncates)."""
        return [int(dim * x) for x in self.layer_structure]


class HypernetworkModule(nn.Module):
    """One of a pair: ``x -> x + linear(x) * multiplier`` for contexts ``dim`` wide."""

    def __init__(self, dim: int, options: HypernetworkOptions):
        super().__init__()
        o, widths = options, options.widths(dim)
        layers: list[nn.Module] = []
        last = len(widths) - 2
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if o.activation != "linear" and (i < last or o.activate_output):
                layers.append(ACTIVATIONS[o.activation]())
            if o.layer_norm:
                layers.append(nn.LayerNorm(widths[i + 1]))
            if o.dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(o.dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: Tensor, multiplier: float = 1.0) -> Tensor:
        return x + self.linear(x) * multiplier  # (..., dim)


class Hypernetwork(nn.Module):
    """The module pairs of one hypernetwork by context width, with its options and the file's
    bookkeeping (A1111's ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``).

    ``pairs["768"]`` is ``ModuleList([h_k, h_v])``; ``multiplier`` scales both residuals. Modules
    are built in eval mode (dropout off); ``transform`` is what attention calls.
    """

    def __init__(self, widths: Iterable[int], options: HypernetworkOptions, name: str = "hypernetwork",
                 step: int = 0, sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None,
                 multiplier: float = 1.0):
        super().__init__()
        self.options, self.name, self.step = options, name, step
        self.sd_checkpoint, self.sd_checkpoint_name = sd_checkpoint, sd_checkpoint_name
        self.multiplier = multiplier
        self.pairs = nn.ModuleDict({
            str(w): nn.ModuleList([HypernetworkModule(w, options), HypernetworkModule(w, options)])
            for w in sorted(set(widths))})
        self.eval()

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.pairs)

    def transform(self, context_k: Tensor, context_v: Tensor) -> tuple[Tensor, Tensor]:
        """(k context, v context) after this hypernetwork; unchanged for a width it has no pair for.
        Runs in the modules' dtype and returns the input's (A1111 runs them in float32)."""
        width = str(context_k.shape[-1])
        if width not in self.pairs:
            return context_k, context_v
        pair = self.pairs[width]
        dtype = pair[0].linear[0].weight.dtype
        k = pair[0](context_k.to(dtype), self.multiplier).to(context_k.dtype)
        v = pair[1](context_v.to(dtype), self.multiplier).to(context_v.dtype)
        return k, v


def initialize_(hn: Hypernetwork, generator: torch.Generator | None = None) -> Hypernetwork:
    """A fresh hypernetwork's weights as A1111's ``HypernetworkModule`` draws them for its
    ``weight_init``, in place. Every Linear and LayerNorm of every module, the last ones
    included (no zero-initialised output layer, so only "Normal" starts close to the identity):

        Normal           weight ~ N(0, 0.01^2)
        XavierUniform    xavier_uniform_(weight)      XavierNormal   xavier_normal_(weight)
        KaimingUniform   kaiming_uniform_(weight)     KaimingNormal  kaiming_normal_(weight)
                         (nonlinearity "leaky_relu" for activation leakyrelu, else "relu"; a = 0)
        every bias       0
        LayerNorm        weight ~ N(0, 0.01^2) whatever ``weight_init`` (A1111 treats it as
                         "Normal"), bias 0: its gain starts near 0, not 1

    Other parameters (PReLU's slope) keep torch's defaults."""
    init = hn.options.weight_init
    if init not in WEIGHT_INITS:
        raise ValueError(f"unknown hypernetwork weight initialization {init!r}; valid: {', '.join(WEIGHT_INITS)}")
    relu = "leaky_relu" if hn.options.activation == "leakyrelu" else "relu"
    g = generator
    with torch.no_grad():
        for layer in hn.modules():
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue
            w = layer.weight
            if init == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(w, 0.0, 0.01, generator=g)
            elif init == "XavierUniform":
                nn.init.xavier_uniform_(w, generator=g)
            elif init == "XavierNormal":
                nn.init.xavier_normal_(w, generator=g)
            elif init == "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=relu, generator=g)
            else:
                nn.init.kaiming_normal_(w, nonlinearity=relu, generator=g)
            nn.init.zeros_(layer.bias)
    return hn


class HypernetworkTransform:
    """Attention's context transform for a list of hypernetworks, applied in turn (A1111's
    ``apply_hypernetworks``). A plain callable, not a module: set on a U-Net's attention layers
    it stays out of the U-Net's ``state_dict``."""

    def __init__(self, hypernetworks: Sequence[Hypernetwork]):
        self.hypernetworks = list(hypernetworks)

    def __call__(self, context: Tensor) -> tuple[Tensor, Tensor]:
        k = v = context  # (B, M, C)
        for hn in self.hypernetworks:
            k, v = hn.transform(k, v)
        return k, v
