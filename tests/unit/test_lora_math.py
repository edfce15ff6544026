"""nn/lora.py against closed forms written out here: the delta of each adapter kind, the wrappers'
forward, the state_dict key rule, add/remove, merging, and the errors on bad inputs. fp32, tolerances
1e-5 relative unless exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unfog.nn.lora import (
    AdapterLayer,
    AdapterWeights,
    LoRALayer,
    add_adapter_layers,
    add_lora,
    merged_weight,
    remove_lora,
)

G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def lora(out: int, inp: int, r: int, k: tuple[int, ...] = (), alpha: float | None = None) -> AdapterWeights:
    up = rand(out, r, *[1] * len(k))
    return AdapterWeights("lora", {"lora_down": rand(r, inp, *k), "lora_up": up}, alpha)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 12), nn.Conv2d(4, 6, 3, stride=2, padding=1))])
        self.proj = nn.Linear(12, 5, bias=False)


# ------------------------------------------------------------------ deltas against closed forms


def test_lora_linear_delta_is_scaled_up_times_down():
    a = lora(12, 8, 3, alpha=1.5)
    close(a.delta((12, 8)), 0.5 * a.tensors["lora_up"] @ a.tensors["lora_down"])


def test_lora_conv_delta_is_einsum_over_rank():
    a = lora(6, 4, 3, (3, 3), alpha=6.0)
    want = 2.0 * torch.einsum("or,rihw->oihw", a.tensors["lora_up"][:, :, 0, 0], a.tensors["lora_down"])
    close(a.delta((6, 4, 3, 3)), want)


def test_lora_mid_tucker_delta():
    up, mid, down = rand(6, 3, 1, 1), rand(3, 3, 3, 3), rand(3, 4, 1, 1)
    a = AdapterWeights("lora", {"lora_down": down, "lora_up": up, "lora_mid": mid}, 1.0)
    want = torch.einsum("op,pqhw,qi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) / 3
    close(a.delta((6, 4, 3, 3)), want)


def test_linear_shaped_lora_on_1x1_conv_and_back():
    flat = lora(6, 4, 2)
    conv = AdapterWeights("lora", {k: v[..., None, None] for k, v in flat.tensors.items()})
    close(flat.delta((6, 4, 1, 1)), conv.delta((6, 4, 1, 1)))
    close(conv.delta((6, 4)), flat.delta((6, 4)))
    close(flat.delta((6, 4, 1, 1))[:, :, 0, 0], flat.tensors["lora_up"] @ flat.tensors["lora_down"])


@pytest.mark.parametrize("r", [1, 3, 5])
def test_rank_r_lora_has_rank_r(r):
    assert torch.linalg.matrix_rank(lora(20, 16, r).delta((20, 16))) == r


def test_missing_or_zero_alpha_means_scale_one():
    for alpha in (None, 0, 0.0):
        a = lora(5, 4, 2, alpha=alpha)
        assert a.scale == 1.0
        close(a.delta((5, 4)), a.tensors["lora_up"] @ a.tensors["lora_down"])


def test_loha_is_hadamard_of_two_products_with_rank_r_squared():
    t = {"hada_w1_a": rand(20, 2), "hada_w1_b": rand(2, 16), "hada_w2_a": rand(20, 2), "hada_w2_b": rand(2, 16)}
    a = AdapterWeights("loha", t, 1.0)
    want = 0.5 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    close(a.delta((20, 16)), want)
    assert torch.linalg.matrix_rank(want) == 4


def test_loha_conv_flattened_and_tucker():
    t = {"hada_w1_a": rand(6, 2), "hada_w1_b": rand(2, 36), "hada_w2_a": rand(6, 2), "hada_w2_b": rand(2, 36)}
    want = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(6, 4, 3, 3)
    close(AdapterWeights("loha", t).delta((6, 4, 3, 3)), want)
    tk = {"hada_w1_a": rand(2, 6), "hada_w1_b": rand(2, 4), "hada_t1": rand(2, 2, 3, 3)}
    tk |= {"hada_w2_a": rand(2, 6), "hada_w2_b": rand(2, 4), "hada_t2": rand(2, 2, 3, 3)}
    half = [torch.einsum("pqhw,po,qi->oihw", tk[f"hada_t{j}"], tk[f"hada_w{j}_a"], tk[f"hada_w{j}_b"]) for j in "12"]
    close(AdapterWeights("loha", tk, 4.0).delta((6, 4, 3, 3)), 2.0 * half[0] * half[1])


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Kronecker product from its definition: K[i*b + j, l*d + k, ...] = w1[i, l] * w2[j, k, ...]."""
    (a, c), (b, d, *k) = w1.shape, w2.shape
    return torch.einsum("il,jk...->ijlk...", w1, w2).reshape(a * b, c * d, *k)


def test_lokr_full_factors_scale_one_whatever_alpha():
    w1, w2 = rand(2, 4), rand(6, 3)
    a = AdapterWeights("lokr", {"lokr_w1": w1, "lokr_w2": w2}, alpha=7.0)
    assert (a.rank, a.scale) == (1, 1.0)
    close(a.delta((12, 12)), kron(w1, w2))


def test_lokr_low_rank_factors():
    w1, w2a, w2b = rand(2, 4), rand(6, 2), rand(2, 3)
    a = AdapterWeights("lokr", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, alpha=1.0)
    assert (a.rank, a.scale) == (2, 0.5)
    close(a.delta((12, 12)), 0.5 * kron(w1, w2a @ w2b))
    w1a, w1b = rand(2, 2), rand(2, 4)
    both = AdapterWeights("lokr", {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, 4.0)
    close(both.delta((12, 12)), 2.0 * kron(w1a @ w1b, w2a @ w2b))


def test_lokr_conv_flattened_full_and_tucker():
    w1, w2a, w2b = rand(2, 2), rand(3, 2), rand(2, 2 * 9)
    a = AdapterWeights("lokr", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, 2.0)
    close(a.delta((6, 4, 3, 3)), kron(w1, (w2a @ w2b).reshape(3, 2, 3, 3)))
    w2 = rand(3, 2, 3, 3)
    close(AdapterWeights("lokr", {"lokr_w1": w1, "lokr_w2": w2}).delta((6, 4, 3, 3)), kron(w1, w2))
    t2, ta, tb = rand(2, 2, 3, 3), rand(2, 3), rand(2, 2)
    tucker = AdapterWeights("lokr", {"lokr_w1": w1, "lokr_w2_a": ta, "lokr_w2_b": tb, "lokr_t2": t2}, 1.0)
    close(tucker.delta((6, 4, 3, 3)), 0.5 * kron(w1, torch.einsum("pqhw,po,qi->oihw", t2, ta, tb)))


# ------------------------------------------------------------------ merging


def test_merged_weight_empty_is_exact_and_sum_of_deltas():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = rand(12, 8).to(dtype)
        assert torch.equal(merged_weight(w, []), w)
    w, a, b = rand(12, 8), lora(12, 8, 2, alpha=1.0), lora(12, 8, 4)
    close(merged_weight(w, [(a, 0.7), (b, -1.5)]), w + 0.7 * a.delta(w.shape) - 1.5 * b.delta(w.shape))
    back = merged_weight(merged_weight(w, [(a, 0.7)]), [(a, -0.7)])
    close(back, w)
    half = merged_weight(w.half(), [(a, 1.0)])
    assert half.dtype == torch.float16
    close(half.float(), (w.half().float() + a.delta(w.shape)).half().float())


def test_dora_rows_take_the_stored_magnitude_and_multiplier_interpolates():
    w, a = rand(12, 8), lora(12, 8, 2)
    s = rand(12, 1).abs() + 0.5
    d = AdapterWeights("lora", {**a.tensors, "dora_scale": s})
    full = merged_weight(w, [(d, 1.0)])
    close(full.norm(dim=1, keepdim=True), s)
    wp = w + a.delta(w.shape)
    close(full, wp * s / wp.norm(dim=1, keepdim=True))
    assert torch.equal(merged_weight(w, [(d, 0.0)]), w)
    close(merged_weight(w, [(d, 0.25)]), w + 0.25 * (full - w))
    s_in = rand(1, 8).abs() + 0.5  # per input column
    cols = merged_weight(w, [(AdapterWeights("lora", {**a.tensors, "dora_scale": s_in}), 1.0)])
    close(cols.norm(dim=0, keepdim=True), s_in)


# ------------------------------------------------------------------ wrappers


def test_zero_up_wrapper_is_identity_and_forward_is_base_plus_delta():
    torch.manual_seed(0)
    model = Model()
    x, xc = rand(3, 8), rand(2, 4, 9, 9)
    ref_lin, ref_conv = model.blocks[0][0](x), model.blocks[0][1](xc)
    layers = add_lora(model, ["blocks.0.0", "blocks.0.1"], rank=3, alpha=1.5)
    lin, conv = model.blocks[0]
    assert torch.equal(lin(x), ref_lin) and torch.equal(conv(xc), ref_conv)
    for layer in layers.values():
        nn.init.normal_(layer.lora_up.weight)
        layer.multiplier = 0.8
    delta = layers["blocks.0.0"].adapter_weights().delta(lin.weight.shape)
    close(lin(x), ref_lin + 0.8 * F.linear(x, delta))
    delta = layers["blocks.0.1"].adapter_weights().delta(conv.weight.shape)
    close(conv(xc), ref_conv + 0.8 * F.conv2d(xc, delta, stride=2, padding=1))


def test_state_dict_keys_of_base_unchanged_and_same_parameters():
    model = Model()
    before = dict(model.state_dict(keep_vars=True))
    add_lora(model, ["blocks.0.0", "proj"], rank=2, alpha=2.0)
    after = model.state_dict(keep_vars=True)
    assert set(after) - set(before) == {
        f"{m}.{k}" for m in ("blocks.0.0", "proj") for k in ("alpha", "lora_down.weight", "lora_up.weight")
    }
    assert all(after[k] is v for k, v in before.items())  # the same Parameter objects, no copies
    trainable = {n for n, p in model.named_parameters() if "lora_" in n}
    assert trainable == {f"{m}.lora_{k}.weight" for m in ("blocks.0.0", "proj") for k in ("down", "up")}


def test_add_then_remove_restores_modules_and_follows_moves():
    model = Model()
    originals = {n: m for n, m in model.named_modules()}
    keys = list(model.state_dict())
    add_lora(model, ["blocks.0.1", "proj"], rank=2, alpha=1.0)
    add_adapter_layers(model, ["blocks.0.0"])
    model.double()
    remove_lora(model)
    assert {n: m for n, m in model.named_modules()} == originals
    assert list(model.state_dict()) == keys
    assert model.proj.weight.dtype == torch.float64 and model.blocks[0][1].bias.dtype == torch.float64


def test_adapter_layer_applies_adapters_and_tracks_weight_changes():
    model = Model()
    base = model.blocks[0][1]
    x = rand(2, 4, 9, 9)
    ref = base(x)
    keys = list(model.state_dict())
    layer = add_adapter_layers(model, ["blocks.0.1"])["blocks.0.1"]
    assert list(model.state_dict()) == keys
    assert torch.equal(layer(x), ref)
    a, b = lora(6, 4, 2, (3, 3), alpha=1.0), lora(6, 4, 3, (3, 3))
    layer.set_adapters([(a, 0.5), (b, 1.0)])
    delta = 0.5 * a.delta((6, 4, 3, 3)) + b.delta((6, 4, 3, 3))
    close(layer(x), ref + F.conv2d(x, delta, stride=2, padding=1))
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the cached merge must follow
    close(layer(x), F.conv2d(x, 2 * w0 + delta, base.bias, stride=2, padding=1))
    layer.set_adapters([])
    assert torch.equal(layer(x), base(x))


# ------------------------------------------------------------------ bad inputs


def bad(call, *words: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_adapters_give_one_line_value_errors():
    down, up = rand(3, 8), rand(12, 3)
    bad(lambda: AdapterWeights("lora", {"lora_down": down}).delta((12, 8)), "missing", "lora_up")
    bad(lambda: AdapterWeights("lora", {"lora_down": down, "lora_up": rand(12, 2)}).rank, "ranks disagree")
    bad(lambda: AdapterWeights("lora", {"lora_down": down, "lora_up": up}).delta((12, 9)), "(12, 8)", "(12, 9)")
    bad(lambda: AdapterWeights("lora", {"lora_down": down, "lora_up": up, "x": up}).check(), "unknown", "lora_mid")
    bad(lambda: AdapterWeights("ia3", {}).check(), "ia3", "lora, loha, lokr")
    bad(lambda: AdapterWeights("lora", {"lora_down": rand(3), "lora_up": up}).rank, "lora_down", "2-D")
    conv = {"lora_down": rand(3, 4, 3, 3), "lora_up": rand(6, 3, 1, 1)}
    bad(lambda: AdapterWeights("lora", conv).delta((6, 36)), "(6, 4, 3, 3)", "(6, 36)")
    loha = {"hada_w1_a": rand(12, 2), "hada_w1_b": rand(2, 8), "hada_w2_a": rand(12, 3), "hada_w2_b": rand(3, 8)}
    bad(lambda: AdapterWeights("loha", loha).rank, "ranks disagree", "hada_w2_a")
    bad(lambda: AdapterWeights("loha", {**loha, "hada_t1": rand(2, 2, 3, 3)}).check(), "hada_t1", "hada_t2")
    bad(lambda: AdapterWeights("lokr", {"lokr_w1": rand(2, 2), "lokr_w1_a": rand(2, 1), "lokr_w2": up}).check(), "lokr_w1")
    bad(lambda: AdapterWeights("lokr", {"lokr_w1": rand(2, 2)}).check(), "lokr_w2")
    lokr = {"lokr_w1": rand(2, 2), "lokr_w2_a": rand(6, 2), "lokr_w2_b": rand(3, 4)}
    bad(lambda: AdapterWeights("lokr", lokr).check(), "ranks disagree")
    dora = AdapterWeights("lora", {"lora_down": down, "lora_up": up, "dora_scale": rand(5, 1)})
    bad(lambda: merged_weight(rand(12, 8), [(dora, 1.0)]), "dora_scale", "(5, 1)")


def test_bad_wrapping_gives_value_errors_and_leaves_model_alone():
    model = Model()
    keys = list(model.state_dict())
    bad(lambda: add_lora(model, ["proj", "blocks.0.9"], 2, 1.0), "blocks.0.9")
    bad(lambda: add_lora(model, ["blocks"], 2, 1.0), "ModuleList", "nn.Linear")
    bad(lambda: add_lora(model, ["proj"], 0, 1.0), "rank")
    assert list(model.state_dict()) == keys and isinstance(model.proj, nn.Linear)
    add_lora(model, ["proj"], 2, 1.0)
    bad(lambda: add_lora(model, ["proj"], 2, 1.0), "wrapped")
    bad(lambda: LoRALayer(nn.Conv2d(4, 4, 3, groups=2), 2, 1.0), "groups")
    layer = AdapterLayer(nn.Linear(8, 12), [(lora(12, 8, 2), 1.0)])
    bad(lambda: layer.set_adapters([(lora(12, 9, 2), 1.0)]), "(12, 9)", "(12, 8)")
    assert len(layer.adapters) == 1
