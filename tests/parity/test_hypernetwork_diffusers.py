"""Hypernetworks against diffusers: a random file in AUTOMATIC1111's ``.pt`` layout, read by unfog
and applied through the U-Net's context-transform hook, gives the output of diffusers'
UNet2DConditionModel (same weights) fitted with an attention processor written here that runs
the file's module pair on the context before ``to_k`` / ``to_v``, as A1111's
``attention_CrossAttention_forward`` does. Relative error <= 1e-4 in float32, for every
activation unfog accepts and every option (layer norm, dropout structure, activate_output,
deeper layer structures, legacy ``linear1`` / ``linear2`` keys, the multiplier, two chained
hypernetworks).

The reference modules are built here, from the file, with A1111's rules as read in its
``HypernetworkModule.__init__`` (activation classes looked up by lower-case torch.nn name, as
A1111 does), not with unfog's ``nn.hypernetwork``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import randomize_, rel_err  # noqa: E402
from oracles import diffusers_twin, load_into_diffusers  # noqa: E402

from unfog.checkpoint.hypernetwork import read_hypernetwork  # noqa: E402
from unfog.models.unet import UNet, UNetConfig  # noqa: E402
from unfog.nn.hypernetwork import ACTIVATIONS, HypernetworkTransform  # noqa: E402

RTOL = 1e-4
# Attention at widths 32 and 64 (self) and a 48-wide text context (cross), as SD1 has 320/640/1280
# and 768: every width is its own module pair.
CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                 num_heads=2, context_dim=48)
WIDTHS = (32, 48, 64)

_TORCH_ACTIVATIONS = {name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation)
                      if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"}
_A1111_NAMED = {"linear": torch.nn.Identity, "swish": torch.nn.Hardswish}


def reference_module(dim: int, opts: dict) -> torch.nn.Sequential:
    """A1111's HypernetworkModule.linear for width ``dim`` and the file's options (given in full)."""
    ls, ds = opts["layer_structure"], opts["dropout_structure"]
    act = opts["activation_func"]
    layers = []
    for i in range(len(ls) - 1):
        layers.append(torch.nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
        if act not in (None, "linear") and not (i >= len(ls) - 2 and not opts["activate_output"]):
            layers.append({**_TORCH_ACTIVATIONS, **_A1111_NAMED}[act]())
        if opts["is_layer_norm"]:
            layers.append(torch.nn.LayerNorm(int(dim * ls[i + 1])))
        if ds[i + 1] > 0:
            layers.append(torch.nn.Dropout(ds[i + 1]))
    return torch.nn.Sequential(*layers).eval()


def random_file(path: Path, opts: dict, seed: int, widths=WIDTHS) -> dict[int, list[torch.nn.Sequential]]:
    """torch.save an A1111-layout hypernetwork with random weights; returns its reference modules."""
    g = torch.Generator().manual_seed(seed)
    modules, raw = {}, {}
    for w in widths:
        pair = [reference_module(w, opts), reference_module(w, opts)]
        for m in pair:
            for p in m.parameters():
                scale = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.3
                p.data = torch.randn(p.shape, generator=g) * scale
        modules[w] = pair
        raw[w] = tuple({f"linear.{k}": v for k, v in m.state_dict().items()} for m in pair)  # HypernetworkModule.linear
    raw.update(opts, name=path.stem, step=123, sd_checkpoint="0123456789", sd_checkpoint_name="random")
    torch.save(raw, path)
    return modules


class HypernetProcessor:
    """diffusers attention with A1111's hypernetwork: each module pair (by context width) turns the
    context into ``c + h(c) * m`` for to_k and to_v; several chain; the query is untouched."""

    def __init__(self, hypernets: list[dict[int, list[torch.nn.Sequential]]], multipliers: list[float]):
        self.hypernets, self.multipliers = hypernets, multipliers

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ck = cv = context
        for hn, m in zip(self.hypernets, self.multipliers):
            if context.shape[-1] in hn:
                hk, hv = hn[context.shape[-1]]
                ck, cv = ck + hk(ck) * m, cv + hv(cv) * m
        q, k, v = attn.to_q(hidden_states), attn.to_k(ck), attn.to_v(cv)
        b, h = q.shape[0], attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = randomize_(UNet(CFG), seed=1).eval()
    twin = diffusers_twin(CFG)
    load_into_diffusers(ours, twin)
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 48, generator=g))
    return ours, twin, inputs


def compare(models, files: list[Path], refs: list[dict], multipliers: list[float]) -> float:
    ours, twin, (x, t, ctx) = models
    hns = [read_hypernetwork(f) for f in files]
    for hn, m in zip(hns, multipliers):
        hn.multiplier = m
    ours.set_context_transform(HypernetworkTransform(hns))
    twin.set_attn_processor(HypernetProcessor(refs, multipliers))
    try:
        with torch.no_grad():
            got, want = ours(x, t, ctx), twin(x, t, encoder_hidden_states=ctx).sample
            ours.set_context_transform(None)
            plain = ours(x, t, ctx)
    finally:
        ours.set_context_transform(None)
    assert rel_err(plain, want) > 1e-3, "the hypernetwork changed nothing: the test could not fail"
    return rel_err(got, want)


def options(**kw) -> dict:
    base = {"layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False,
            "weight_initialization": "Normal", "use_dropout": False, "dropout_structure": [0, 0, 0],
            "activate_output": False, "last_layer_dropout": False}
    return base | kw


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation(models, tmp_path, activation):
    opts = options(activation_func=activation)
    refs = random_file(tmp_path / "hn.pt", opts, seed=3)
    assert compare(models, [tmp_path / "hn.pt"], [refs], [1.0]) <= RTOL


@pytest.mark.parametrize("opts", [
    options(activation_func="relu", is_layer_norm=True),
    options(activation_func="swish", activate_output=True),
    options(activation_func="prelu", activate_output=True, is_layer_norm=True),
    options(activation_func="elu", layer_structure=[1, 1.5, 0.5, 1], use_dropout=True,
            dropout_structure=[0, 0.3, 0.1, 0]),
    options(activation_func="tanh", layer_structure=[1, 2, 2, 1], use_dropout=True, dropout_structure=[0, 0.3, 0.3, 0],
            is_layer_norm=True, last_layer_dropout=True),
    options(activation_func="leakyrelu", layer_structure=[1, 1]),
], ids=["layernorm", "activate-output", "prelu-layernorm", "dropout-fractional-widths", "deep-dropout-layernorm",
        "single-linear"])
def test_options(models, tmp_path, opts):
    refs = random_file(tmp_path / "hn.pt", opts, seed=4)
    assert compare(models, [tmp_path / "hn.pt"], [refs], [1.0]) <= RTOL


def test_multiplier_and_two_chained_hypernetworks(models, tmp_path):
    a = random_file(tmp_path / "a.pt", options(activation_func="relu"), seed=5)
    b = random_file(tmp_path / "b.pt", options(activation_func="sigmoid", is_layer_norm=True), seed=6, widths=(48, 64))
    assert compare(models, [tmp_path / "a.pt", tmp_path / "b.pt"], [a, b], [0.6, -1.3]) <= RTOL


def test_legacy_keys_and_missing_options(models, tmp_path):
    """Files from before October 2022: linear1 / linear2 keys and no option keys (A1111's load
    defaults: layer structure [1, 2, 1], no activation, no layer norm, no dropout)."""
    opts = options()
    refs = random_file(tmp_path / "new.pt", opts, seed=7)
    legacy = {w: [{f"linear{int(k[0]) + 1}{k[1:]}": v for k, v in m.state_dict().items()} for m in pair]
              for w, pair in refs.items()}
    assert all("linear1.weight" in sd for pair in legacy.values() for sd in pair)
    torch.save(legacy, tmp_path / "old.pt")
    assert compare(models, [tmp_path / "old.pt"], [refs], [1.0]) <= RTOL
