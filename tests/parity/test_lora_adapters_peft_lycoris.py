"""nn/lora.py against PEFT (the LoRA layer's forward and delta) and lycoris-lora (the Delta W of LoRA /
LoCon, LoHa and LoKr in every stored variant, the DoRA merge, and the trainable LoHa / LoKr layers
against LyCORIS' own LohaModule / LokrModule), on the same random tensors. Tolerance: 1e-5 relative, fp32.

lycoris' functional API takes `gamma` = alpha / rank for locon and loha; lokr.diff_weight takes gamma =
alpha and divides by the rank itself (w1a.shape[1] or w2a.shape[1], else no scale)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from lycoris.functional import apply_dora_scale, factorization, locon, loha, lokr, weight_decompose
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from peft import LoraConfig, get_peft_model

from unfog.nn import lora as unfog_lora
from unfog.nn.lora import AdapterWeights, add_lora, merged_weight

RTOL = 1e-5
G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


# ------------------------------------------------------------------ (a) LoRA layer vs PEFT


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)


def test_lora_layer_matches_peft_linear_and_strided_conv():
    torch.manual_seed(0)
    rank, alpha = 4, 6.0
    net = Net()
    ours = copy.deepcopy(net)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin", "conv"], use_rslora=False)
    peft_net = get_peft_model(net, config).base_model.model
    layers = add_lora(ours, ["lin", "conv"], rank, alpha)
    inputs = {"lin": rand(5, 16), "conv": rand(2, 8, 11, 11)}
    for name, layer in layers.items():
        ref = getattr(peft_net, name)
        down, up = rand(*layer.lora_down.weight.shape), rand(*layer.lora_up.weight.shape)
        with torch.no_grad():
            for w, v in ((ref.lora_A["default"].weight, down), (ref.lora_B["default"].weight, up),
                         (layer.lora_down.weight, down), (layer.lora_up.weight, up)):
                w.copy_(v)
            close(layer(inputs[name]), ref(inputs[name]))
            delta = layer.adapter_weights().delta(layer.weight.shape)
            close(delta, ref.get_delta_weight("default"))


# ------------------------------------------------------------------ (b) Delta W vs lycoris functional

# (name, weight shape, rank, tensors) with tensors in the stored (module / file) layout
LORA_CASES = [
    ("linear", (24, 16), 4, lambda: {"lora_down": rand(4, 16), "lora_up": rand(24, 4)}),
    ("conv3x3", (12, 8, 3, 3), 4, lambda: {"lora_down": rand(4, 8, 3, 3), "lora_up": rand(12, 4, 1, 1)}),
    ("conv1x1", (12, 8, 1, 1), 4, lambda: {"lora_down": rand(4, 8, 1, 1), "lora_up": rand(12, 4, 1, 1)}),
    ("mid", (12, 8, 3, 3), 4,
     lambda: {"lora_down": rand(4, 8, 1, 1), "lora_up": rand(12, 4, 1, 1), "lora_mid": rand(4, 4, 3, 3)}),
]


@pytest.mark.parametrize("name, shape, rank, make", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_lora_delta_matches_lycoris_locon(name, shape, rank, make):
    t, alpha = make(), 3.0
    ref = locon.diff_weight(t["lora_down"], t["lora_up"], t.get("lora_mid"), gamma=alpha / rank, backend="torch")
    close(AdapterWeights("lora", t, alpha).delta(shape), ref.reshape(shape))


def loha_flat(out: int, flat_in: int, r: int) -> dict[str, torch.Tensor]:
    return {"hada_w1_a": rand(out, r), "hada_w1_b": rand(r, flat_in), "hada_w2_a": rand(out, r),
            "hada_w2_b": rand(r, flat_in)}


def loha_tucker(out: int, inp: int, r: int, k: int) -> dict[str, torch.Tensor]:
    return {"hada_w1_a": rand(r, out), "hada_w1_b": rand(r, inp), "hada_t1": rand(r, r, k, k),
            "hada_w2_a": rand(r, out), "hada_w2_b": rand(r, inp), "hada_t2": rand(r, r, k, k)}


LOHA_CASES = [
    ("linear", (24, 16), 4, lambda: loha_flat(24, 16, 4)),
    ("conv3x3", (12, 8, 3, 3), 4, lambda: loha_flat(12, 8 * 9, 4)),
    ("conv1x1", (12, 8, 1, 1), 4, lambda: loha_flat(12, 8, 4)),
    ("tucker3x3", (12, 8, 3, 3), 3, lambda: loha_tucker(12, 8, 3, 3)),
]


@pytest.mark.parametrize("name, shape, rank, make", LOHA_CASES, ids=[c[0] for c in LOHA_CASES])
def test_loha_delta_matches_lycoris(name, shape, rank, make):
    t, alpha = make(), 2.0
    ref = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"),
                           t.get("hada_t2"), gamma=alpha / rank, backend="torch")
    close(AdapterWeights("loha", t, alpha).delta(shape), ref.reshape(shape))


LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# out = a*b, in = c*d; w1 (a, c) is the small factor, w2 (b, d[, k, k]) the large one, as LyCORIS makes them
LOKR_CASES = [
    ("linear_full_lowrank", (24, 16), {"lokr_w1": (4, 2), "lokr_w2_a": (6, 3), "lokr_w2_b": (3, 8)}),
    ("linear_both_lowrank", (24, 16),
     {"lokr_w1_a": (4, 3), "lokr_w1_b": (3, 2), "lokr_w2_a": (6, 3), "lokr_w2_b": (3, 8)}),
    ("linear_both_full", (24, 16), {"lokr_w1": (4, 2), "lokr_w2": (6, 8)}),
    ("conv3x3_full_lowrank", (12, 8, 3, 3), {"lokr_w1": (3, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4 * 9)}),
    ("conv3x3_both_full", (12, 8, 3, 3), {"lokr_w1": (3, 2), "lokr_w2": (4, 4, 3, 3)}),
    ("conv1x1_full_lowrank", (12, 8, 1, 1), {"lokr_w1": (3, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4)}),
]


@pytest.mark.parametrize("name, shape, spec", LOKR_CASES, ids=[c[0] for c in LOKR_CASES])
def test_lokr_delta_matches_lycoris(name, shape, spec):
    t, alpha = {k: rand(*s) for k, s in spec.items()}, 1.5
    ref = lokr.diff_weight(*(t.get(k) for k in LOKR_KEYS), gamma=alpha, backend="torch")
    close(AdapterWeights("lokr", t, alpha).delta(shape), ref.reshape(shape))


def test_lokr_tucker_delta_matches_lycoris_kron_weight_with_the_training_rank():
    """Tucker LoKr: lokr.diff_weight would read the rank off lokr_w2_a.shape[1], which in the Tucker
    layout (r, b) is b, not r; LokrModule trains with scale alpha / lora_dim, which is what we use (and
    ComfyUI, which reads r off lokr_w2_b). So the oracle is kron_weight with that scale. b != r here."""
    r, alpha, shape = 2, 3.0, (12, 8, 3, 3)
    t = {"lokr_w1": rand(3, 2), "lokr_w2_a": rand(r, 4), "lokr_w2_b": rand(r, 4), "lokr_t2": rand(r, r, 3, 3)}
    ref = lokr.kron_weight(*(t.get(k) for k in LOKR_KEYS), scale=alpha / r, backend="torch")
    close(AdapterWeights("lokr", t, alpha).delta(shape), ref.reshape(shape))


# ------------------------------------------------------------------ (c) DoRA merge vs lycoris


@pytest.mark.parametrize("wd_on_out", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_merge_matches_lycoris_locon_module(kind, wd_on_out):
    torch.manual_seed(0)
    base = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
    rank, alpha = 4, 2.0
    module = LoConModule("x", base, 1.0, rank, alpha, weight_decompose=True, wd_on_out=wd_on_out)
    with torch.no_grad():
        for p in (module.lora_down.weight, module.lora_up.weight):
            p.copy_(rand(*p.shape))
        module.dora_scale.mul_(1 + rand(*module.dora_scale.shape).abs())
    tensors = {"lora_down": module.lora_down.weight, "lora_up": module.lora_up.weight,
               "dora_scale": module.dora_scale}
    adapter = AdapterWeights("lora", {k: v.detach() for k, v in tensors.items()}, alpha)
    with torch.no_grad():
        ref, _ = module.get_merged_weight(multiplier=1.0, shape=base.weight.shape)
    close(merged_weight(base.weight.detach(), [(adapter, 1.0)]), ref)


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_loha_merge_matches_lycoris_weight_decompose(wd_on_out):
    w, t, alpha = rand(12, 8, 3, 3), loha_flat(12, 8 * 9, 4), 2.0
    s = rand(12, 1, 1, 1).abs() + 0.5 if wd_on_out else rand(1, 8, 1, 1).abs() + 0.5
    diff = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
                            gamma=alpha / 4, backend="torch").reshape(w.shape)
    ref = weight_decompose(w + diff, s, 1.0, wd_on_out, backend="torch")
    close(merged_weight(w, [(AdapterWeights("loha", {**t, "dora_scale": s}, alpha), 1.0)]), ref)


@pytest.mark.parametrize("multiplier", [0.0, 0.4, 1.0])
def test_dora_multiplier_matches_lycoris_apply_dora_scale(multiplier):
    """At m != 1 we interpolate W + m (W_dora - W), which is lycoris.functional.apply_dora_scale (a
    per-input-column magnitude)."""
    w, t = rand(24, 16), {"lora_down": rand(4, 16), "lora_up": rand(24, 4)}
    s = rand(1, 16).abs() + 0.5
    adapter = AdapterWeights("lora", {**t, "dora_scale": s}, 2.0)
    ref = apply_dora_scale(w, adapter.delta(w.shape), s, multiplier)
    close(merged_weight(w, [(adapter, multiplier)]), ref)


# ------------------------------------------------------------------ (d) trainable LoHa / LoKr layers vs lycoris

# LoKr splits out = a*b, in = c*d (128 = 8*16, 64 = 8*8, 32 = 4*8) and makes W2 (b, d) low-rank when
# rank < max(b, d) / 2: the Linear at rank 4 and the conv at rank 2 get lokr_w2_a / lokr_w2_b, at
# rank 8 / 4 a full lokr_w2 (then gamma = 1 whatever alpha is).
LAYER_CASES = [
    ("loha", "linear", 4), ("loha", "conv3x3", 4),
    ("lokr", "linear", 4), ("lokr", "linear", 8), ("lokr", "conv3x3", 2), ("lokr", "conv3x3", 4),
]
BASES = {"linear": (lambda: nn.Linear(64, 128), (5, 64)),
         "conv3x3": (lambda: nn.Conv2d(32, 64, 3, stride=2, padding=1), (2, 32, 9, 9))}
LYCORIS = {"loha": LohaModule, "lokr": LokrModule}


def reference_delta(algo: str, t: dict[str, torch.Tensor], alpha: float, rank: int) -> torch.Tensor:
    if algo == "loha":
        return loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
                                gamma=alpha / rank, backend="torch")
    return lokr.diff_weight(*(t.get(k) for k in LOKR_KEYS), gamma=alpha, backend="torch")


@pytest.mark.parametrize("algo, kind, rank", LAYER_CASES, ids=[f"{a}-{k}-r{r}" for a, k, r in LAYER_CASES])
def test_trainable_layer_matches_lycoris_module_and_functional(algo, kind, rank):
    """The layer holds the tensors LyCORIS' module holds with its defaults (names, shapes, alpha buffer,
    which factor starts at zero); on the same random factors its Delta W equals lycoris' functional
    diff_weight and its forward equals the module's forward."""
    torch.manual_seed(0)
    make, x_shape = BASES[kind]
    base, alpha = make(), 3.0
    layer = add_lora(nn.Sequential(copy.deepcopy(base)), ["0"], rank, alpha, algo)["0"]
    ref = LYCORIS[algo]("x", base, 1.0, rank, alpha)
    theirs = dict(ref.named_parameters())
    ours = {name: getattr(layer, name) for name in layer.factor_names}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert float(layer.alpha) == float(ref.alpha)
    assert {k for k, v in ours.items() if not v.any()} == {k for k, v in theirs.items() if not v.any()} != set()
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(rand(*p.shape))
            theirs[name].copy_(p)
        tensors = {k: v.detach() for k, v in ours.items()}
        close(layer.delta(), reference_delta(algo, tensors, alpha, rank).reshape(base.weight.shape))
        x = rand(*x_shape)
        close(layer(x), ref(x))
    assert layer.adapter_weights().tensors.keys() == ours.keys()


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_trainable_layer_starts_as_the_identity(algo, kind):
    """With its initial factors a layer's Delta W is exactly zero and its output is the base layer's, bit
    for bit; the factors still receive gradients (the zero factor at least)."""
    torch.manual_seed(0)
    make, x_shape = BASES[kind]
    base = make()
    layer = add_lora(nn.Sequential(copy.deepcopy(base)), ["0"], 4, 2.0, algo)["0"]
    delta = layer.adapter_weights().delta(base.weight.shape)
    assert torch.equal(delta, torch.zeros_like(delta))
    x = rand(*x_shape)
    y = layer(x)
    assert torch.equal(y, base(x))
    y.square().sum().backward()
    factors = [p for name, p in layer.named_parameters() if name not in ("weight", "bias")]
    assert len(factors) >= 2 and any(p.grad.abs().sum() > 0 for p in factors)


@pytest.mark.parametrize("dim", [1, 7, 64, 127, 128, 192, 250, 320, 360, 512, 768, 1024, 1280, 2048])
def test_lokr_factorization_is_lycoris_default(dim):
    assert unfog_lora.factorization(dim) == factorization(dim, -1)
