"""Contracts of the U-Net: official checkpoint layouts, shapes, precision, checkpointing, config
validation, and numerical parity with diffusers' UNet2DConditionModel on the same weights."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unfog.models.unet as unet_module
import unfog.nn.blocks as blocks_module
from unfog.models.presets import DIGITS, PRESETS, SD15, TINY, get_preset
from unfog.models.unet import FeatureCache, UNet
from unfog.nn.attention import AttentionBlock, CrossAttention, fuse_projections
from unfog.nn.blocks import BasicTransformerBlock, ResBlock
from unfog.nn.embeddings import timestep_embedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))  # tests/parity: oracles
from model_checks import layout_mismatch, randomize_, rel_err  # noqa: E402
from oracles import diffusers_twin, load_into_diffusers  # noqa: E402

OFFICIAL_LAYOUTS = {
    "SD15": "UNET-v1-SD",
    "SD15_INPAINT": "UNET-v1-Inpainting",
    "SD2": "UNET-v2-SD",
    "SD2_INPAINT": "UNET-v2-Inpainting",
    "SDXL_BASE": "UNET-XL-SD",
    "SDXL_REFINER": "UNET-XL-Refiner",
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ---------------------------------------------------------------- official layouts


@pytest.mark.parametrize("preset", sorted(OFFICIAL_LAYOUTS))
def test_state_dict_matches_official_layout(preset):
    with torch.device("meta"):
        model = UNet(PRESETS[preset])
    mismatch = layout_mismatch(model, OFFICIAL_LAYOUTS[preset])
    assert not mismatch, f"{preset}: {mismatch}"


def test_get_preset():
    assert get_preset("sd15") is SD15
    with pytest.raises(ValueError, match="valid names: SD15, SD15_INPAINT"):
        get_preset("sd3")


# ---------------------------------------------------------------- forward behaviour


def test_tiny_forward_shape():
    model = UNet(TINY).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, TINY.context_dim)
    out = model(x, torch.tensor([1.0, 500.0]), ctx)
    assert out.shape == x.shape
    assert torch.equal(model(x, 3, ctx), model(x, torch.tensor([3, 3]), ctx))  # scalar t broadcasts


def test_digits_forward_shape_and_params():
    model = UNet(DIGITS).eval()
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 3e6
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 9])
    out = model(x, torch.tensor([10, 20, 30]), y=y)
    assert out.shape == x.shape


def test_bf16_autocast_and_bf16_weights():
    model = randomize_(UNet(TINY)).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 700.0]), torch.randn(2, 3, TINY.context_dim)
    ref = model(x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-2
    out_bf16 = model.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    assert rel_err(out_bf16.float(), ref) < 5e-2


@pytest.mark.parametrize("preset", ["DIGITS", "TINY"])
def test_gradient_checkpointing_gives_same_gradients(monkeypatch, preset):
    cfg = replace(get_preset(preset), dropout=0.1)  # dropout too: the recomputation must replay its masks
    plain = randomize_(UNet(cfg)).train()
    ckpt = UNet(replace(cfg, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(type(args[0]))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(blocks_module, "checkpoint", counting_checkpoint)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([3, 900])
    kw = {"y": torch.tensor([1, 7])} if cfg.num_classes else {"context": torch.randn(2, 5, cfg.context_dim, generator=g)}
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(0)
        model(x, t, **kw).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # diffusers' granularity: each ResBlock, self-attention and transformer block, nothing between them
    recomputed = [type(m) for m in ckpt.modules() if isinstance(m, (ResBlock, AttentionBlock, BasicTransformerBlock))]
    assert sorted(map(str, calls)) == sorted(map(str, recomputed))
    assert (AttentionBlock if preset == "DIGITS" else BasicTransformerBlock) in calls
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 999.5])
    emb = timestep_embedding(t, 7)  # half = 3, plus one zero pad column
    for row, ti in zip(emb, t.tolist()):
        args = [ti * math.exp(-math.log(10000) * i / 3) for i in range(3)]
        expected = [math.cos(a) for a in args] + [math.sin(a) for a in args] + [0.0]
        torch.testing.assert_close(row, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert timestep_embedding(t.to(torch.bfloat16), 8).dtype == torch.float32


def test_attention_block_uses_legacy_per_head_qkv_layout():
    torch.manual_seed(0)
    block = randomize_(AttentionBlock(64, num_heads=None, num_head_channels=32))
    x = torch.randn(2, 64, 4, 4)
    qkv = block.qkv(block.norm(x.reshape(2, 64, 16)))  # (B, 3C, T), per head [q, k, v]
    q, k, v = qkv.reshape(2 * 2, 3 * 32, 16).split(32, dim=1)  # (B*H, D, T)
    w = torch.softmax(torch.einsum("bdt,bds->bts", q, k) / math.sqrt(32), dim=-1)
    h = torch.einsum("bts,bds->bdt", w, v).reshape(2, 64, 16)
    expected = (x.reshape(2, 64, 16) + block.proj_out(h)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_resblock_scale_shift_norm():
    block = randomize_(ResBlock(32, 16, 64, use_scale_shift_norm=True))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    h = block.in_layers(x)
    scale, shift = block.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
    norm = block.out_layers[0]
    h = F.silu(F.group_norm(h, 32, norm.weight, norm.bias) * (1 + scale) + shift)
    expected = block.skip_connection(x) + block.out_layers[3](h)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_channels=48), "not divisible by the 32 GroupNorm groups"),
        (dict(transformer_depth=(1,)), "one depth per level"),
        (dict(num_head_channels=16), "exactly one of num_heads"),
        (dict(num_heads=3), "not divisible by num_heads=3"),
        (dict(num_classes="sequential"), "needs adm_in_channels"),
        (dict(num_classes="seq"), 'an int >= 1 or "sequential"'),
        (dict(adm_in_channels=8), 'only used with num_classes="sequential"'),
        (dict(context_dim=None, transformer_depth=(2, 1)), "must be 0 or 1"),
        (dict(context_dim=None, use_linear_projection=True), "needs a SpatialTransformer"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(channel_mult=()), "non-empty"),
    ],
)
def test_bad_config_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **changes)


def test_config_accepts_lists():
    cfg = replace(TINY, channel_mult=[1, 2], transformer_depth=[1, 0])
    assert cfg.channel_mult == (1, 2) and cfg.transformer_depth == (1, 0)
    hash(cfg)


@pytest.mark.parametrize(
    "preset, kwargs, message",
    [
        ("TINY", dict(y=torch.tensor([1, 2])), "not class-conditional"),
        ("TINY", dict(context=None), "pass context"),
        ("TINY", dict(context=torch.randn(2, 3, 5)), "context must be"),
        ("DIGITS", dict(), "pass y"),
        ("DIGITS", dict(y=torch.tensor([1, 2]), context=torch.randn(2, 3, 32)), "no cross-attention"),
        ("DIGITS", dict(y=torch.tensor([1])), r"y must have shape \(2,\)"),
    ],
)
def test_bad_inputs_raise(preset, kwargs, message):
    cfg = PRESETS[preset]
    model = UNet(cfg)
    kwargs = {"context": torch.randn(2, 3, 32) if cfg.context_dim else None, **kwargs}
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, cfg.in_channels, 8, 8), torch.tensor([1, 2]), **kwargs)


@pytest.mark.parametrize("size", [(6, 6), (5, 7), (9, 11)])
def test_any_spatial_size_works(size):
    """Sizes not divisible by 2**(levels-1) come back whole (the Upsamples follow the skips)."""
    out = UNet(DIGITS).eval()(torch.randn(1, 1, *size), 1, y=torch.tensor([0]))
    assert out.shape == (1, 1, *size)


def test_upsample_to_twice_the_size_is_plain_doubling():
    from unfog.nn.blocks import Upsample

    up = randomize_(Upsample(32))
    x = torch.randn(1, 32, 3, 5)
    assert torch.equal(up(x, (6, 10)), up(x))


# ---------------------------------------------------------------- parity with diffusers


SD1_LIKE = replace(TINY, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0))
SD2_LIKE = replace(SD1_LIKE, num_heads=None, num_head_channels=16, use_linear_projection=True)
SDXL_LIKE = replace(  # y = pooled text (16) + 6 size/crop values x 8-wide sinusoids
    SD2_LIKE,
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    num_classes="sequential",
    adm_in_channels=16 + 6 * 8,
)


@pytest.mark.parametrize("cfg", [SD1_LIKE, SD2_LIKE], ids=["sd1-like", "sd2-like"])
def test_parity_with_diffusers(cfg):
    ours = randomize_(UNet(cfg)).eval()
    twin = diffusers_twin(cfg)
    load_into_diffusers(ours, twin)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, cfg.context_dim, generator=g)
    t = torch.tensor([17.0, 803.0])
    with torch.no_grad():
        expected = twin(x, t, encoder_hidden_states=ctx).sample
        assert rel_err(ours(x, t, ctx), expected) < 1e-4


@pytest.mark.parametrize("size", [(9, 11), (5, 8)])
def test_parity_with_diffusers_at_odd_latent_sizes(size):
    """9 x 11 latents (72 x 88 pixels) through 3 levels: downsampled to 5 x 6 and 3 x 3, then
    upsampled to the skips' sizes, as diffusers' forward_upsample_size does."""
    cfg = SD2_LIKE
    ours = randomize_(UNet(cfg)).eval()
    twin = diffusers_twin(cfg)
    load_into_diffusers(ours, twin)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, *size, generator=g), torch.randn(2, 5, cfg.context_dim, generator=g)
    t = torch.tensor([17.0, 803.0])
    with torch.no_grad():
        expected = twin(x, t, encoder_hidden_states=ctx).sample
        mine = ours(x, t, ctx)
    assert mine.shape == expected.shape == x.shape
    assert rel_err(mine, expected) < 1e-4


def test_parity_with_diffusers_sdxl_like():
    cfg = SDXL_LIKE
    ours = randomize_(UNet(cfg)).eval()
    twin = diffusers_twin(
        cfg,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=cfg.adm_in_channels,
    )
    load_into_diffusers(ours, twin)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, cfg.context_dim, generator=g)
    pooled = torch.randn(2, 16, generator=g)
    size_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 8, 0, 64, 64]])
    # SDXL's vector y: pooled text embedding, then a 8-wide sinusoidal embedding of each size/crop value.
    y = torch.cat([pooled, timestep_embedding(size_ids.flatten(), 8).reshape(2, -1)], dim=1)
    t = torch.tensor([17.0, 803.0])
    with torch.no_grad():
        cond = {"text_embeds": pooled, "time_ids": size_ids}
        expected = twin(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
        assert rel_err(ours(x, t, ctx, y=y), expected) < 1e-4


# ---------------------------------------------------------------- ControlNet residuals (control=)


def _residuals(model: UNet, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Random residuals shaped as each input block's output, then the middle block's."""
    g = torch.Generator().manual_seed(seed)
    shapes, h = [], x
    with torch.no_grad():
        emb = model.embed(torch.tensor([1.0] * x.shape[0]), x, None, torch.float32)
        ctx = torch.zeros(x.shape[0], 1, model.config.context_dim)
        for block in model.input_blocks:
            h = block(h, emb, ctx)
            shapes.append(h.shape)
        shapes.append(model.middle_block(h, emb, ctx).shape)
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("size", [(8, 8), (9, 11)])
def test_control_residuals_match_diffusers_additional_residuals(size):
    """control= adds the residuals where diffusers adds down_block_additional_residuals (the skips)
    and mid_block_additional_residual (the middle block's output)."""
    cfg = SD1_LIKE
    ours = randomize_(UNet(cfg)).eval()
    twin = diffusers_twin(cfg)
    load_into_diffusers(ours, twin)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, *size, generator=g), torch.randn(2, 5, cfg.context_dim, generator=g)
    t = torch.tensor([17.0, 803.0])
    control = _residuals(ours, x, seed=4)
    assert len(control) == 7  # input conv + 3 levels x 1 ResBlock + 2 Downsamples, then the middle
    with torch.no_grad():
        expected = twin(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(control[:-1]),
                        mid_block_additional_residual=control[-1]).sample
        mine = ours(x, t, ctx, control=control)
        plain = ours(x, t, ctx)
        zeros = ours(x, t, ctx, control=[torch.zeros_like(c) for c in control])
    assert rel_err(mine, expected) < 1e-4
    assert rel_err(mine, plain) > 1e-2  # the residuals matter
    assert torch.equal(zeros, plain)


def test_control_bad_inputs_raise():
    model = UNet(TINY).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32)
    control = _residuals(model, x, seed=0)
    with pytest.raises(ValueError, match=r"control must hold 5 residuals \(4 input blocks and the middle block\), got 4"):
        model(x, 1, ctx, control=control[:-1])
    control[2] = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"control\[2\] has shape \(1, 4, 8, 8\), but the output it joins has"):
        model(x, 1, ctx, control=control)


# ---- DeepCache (FeatureCache) ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["TINY", "DIGITS"])
def test_feature_cache_reused_at_the_same_inputs_is_the_full_pass_at_every_branch(preset):
    """The closed form: the features a full call caches are what the skipped blocks would compute
    again for the same x, t and conditioning, so the partial call must give the same bits."""
    cfg = get_preset(preset)
    unet = randomize_(UNet(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([500.0, 20.0])
    kw = {"y": torch.tensor([1, 7])} if cfg.num_classes else {"context": torch.randn(2, 5, cfg.context_dim, generator=g)}
    middle = []
    unet.middle_block.register_forward_pre_hook(lambda module, args: middle.append(1))
    with torch.no_grad():
        full = unet(x, t, **kw)
        for branch in range(len(unet.input_blocks)):
            cache = FeatureCache(3, branch)
            outs = [unet(x, t, **kw, cache=cache) for _ in range(4)]  # full, partial, partial, full
            assert all(torch.equal(out, full) for out in outs), branch
        assert len(middle) == 1 + 2 * len(unet.input_blocks)  # the partial calls skip the middle block
        with pytest.raises(ValueError, match=f"DeepCache branch must be < {len(unet.input_blocks)}"):
            unet(x, t, **kw, cache=FeatureCache(2, len(unet.input_blocks)))


def test_feature_cache_runs_in_full_when_the_batch_changes_and_checks_its_settings():
    unet = randomize_(UNet(TINY)).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    cache = FeatureCache(4)
    with torch.no_grad():
        unet(x, 10.0, ctx, cache=cache)
        assert not cache.reuse(x[:1])  # call 2: a batch of 1 cannot use features of 2
        assert cache.reuse(x)  # call 3
    with pytest.raises(ValueError, match="DeepCache interval must be >= 1"):
        FeatureCache(0)
    with pytest.raises(ValueError, match="DeepCache branch must be >= 0"):
        FeatureCache(2, -1)


def test_feature_cache_runs_every_call_above_its_start_in_full_and_counts_the_interval_from_the_last():
    unet = randomize_(UNet(TINY)).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    full = []
    unet.middle_block.register_forward_pre_hook(lambda module, args: full.append(1))
    cache = FeatureCache(3, full_above=600.0)
    with torch.no_grad():
        for t in (999.0, 800.0, 601.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 0.0):
            before = len(full)
            unet(x, torch.full((2,), t), ctx, cache=cache)
            full[before:] = [t] if len(full) > before else []
    assert full == [999.0, 800.0, 601.0, 400.0, 100.0]  # above 600: all; then every 3rd from 601's call
    with torch.no_grad():
        assert cache.reuse(x, torch.tensor([0.0, 700.0])) is False  # a row above the start: in full


# ---------------------------------------------------------------- fused projections


def _attention(context_dim=None, seed=0):
    torch.manual_seed(seed)
    return CrossAttention(12, context_dim, heads=3, head_dim=4).eval()


@pytest.mark.parametrize("context_dim", [None, 7], ids=["self", "cross"])
def test_fused_projections_equal_the_separate_ones_with_fewer_matmuls(monkeypatch, context_dim):
    attn = _attention(context_dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 12, generator=g)
    ctx = None if context_dim is None else torch.randn(2, 5, context_dim, generator=g)
    with torch.no_grad():
        separate = attn(x, ctx)
        assert fuse_projections(attn) == 1
        calls = []
        linear = F.linear
        monkeypatch.setattr(F, "linear", lambda inp, w, b=None: calls.append(tuple(w.shape)) or linear(inp, w, b))
        fused = attn(x, ctx)
    # self: one (36, 12) matmul for q, k, v; cross: q alone, one (24, 7) for k and v; then to_out
    assert calls == ([(36, 12), (12, 12)] if context_dim is None else [(12, 12), (24, 7), (12, 12)])
    torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-6)


def test_fused_weight_follows_every_change_of_the_weights():
    attn = _attention()
    fuse_projections(attn)
    x = torch.randn(1, 4, 12)

    def check():  # the fused layer against an unfused copy; the fused layer keeps its cache
        reference = copy.deepcopy(attn)
        fuse_projections(reference, False)
        with torch.no_grad():
            fused, separate = attn(x), reference(x)
        torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-6)

    check()
    with torch.no_grad():
        attn.to_k.weight.add_(1.0)  # in place: a merged LoRA
    check()
    attn.to_v.weight = torch.nn.Parameter(torch.randn(12, 12))  # replaced: a loaded state dict with assign
    check()
    attn.double()  # moved
    x = x.double()
    check()
    attn.load_state_dict(_attention(seed=5).double().state_dict())  # copied in place
    check()


def test_fused_projections_step_aside_for_gradients_wrappers_and_context_transforms():
    from unfog.nn.lora import add_lora

    attn = _attention()
    fuse_projections(attn)
    x = torch.randn(1, 4, 12, requires_grad=True)
    attn(x).sum().backward()  # gradients: the separate path, so every projection gets its own
    assert all(m.weight.grad is not None for m in (attn.to_q, attn.to_k, attn.to_v))

    attn.context_transform = lambda c: (2 * c, -c)
    with torch.no_grad():
        transformed = attn(x)
        fuse_projections(attn, False)
        assert torch.equal(transformed, attn(x))
    attn.context_transform = None

    fuse_projections(attn)
    add_lora(attn, ["to_q", "to_v"], rank=2, alpha=2.0)
    torch.nn.init.normal_(attn.to_v.lora_up.weight)  # a trained adapter: its output is not zero
    with torch.no_grad():
        wrapped = attn(x)
        fuse_projections(attn, False)
        assert torch.equal(wrapped, attn(x))
    assert attn._fused is None


@pytest.mark.parametrize("cfg", [SD1_LIKE, SD2_LIKE], ids=["sd1-like", "sd2-like"])
def test_fused_unet_matches_diffusers_with_fused_projections(cfg):
    """diffusers' ``fuse_qkv_projections`` is the oracle: both U-Nets fused, on the same weights;
    and ours fused equals ours unfused."""
    ours = randomize_(UNet(cfg)).eval()
    twin = diffusers_twin(cfg)
    load_into_diffusers(ours, twin)
    twin.fuse_qkv_projections()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, cfg.context_dim, generator=g)
    t = torch.tensor([17.0, 803.0])
    with torch.no_grad():
        separate = ours(x, t, ctx)
        assert fuse_projections(ours) > 0
        fused = ours(x, t, ctx)
        expected = twin(x, t, encoder_hidden_states=ctx).sample
    assert all(m._fused is not None for m in ours.modules() if isinstance(m, CrossAttention))
    assert rel_err(fused, expected) < 1e-4
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)


def test_fused_projections_leave_torch_compile_the_separate_path():
    """Under torch.compile the layer traces the separate projections (the cache's data_ptr /
    _version key would break the graph): one graph, no breaks, and eager's values."""
    attn = _attention(7)
    fuse_projections(attn)
    x, ctx = torch.randn(2, 9, 12), torch.randn(2, 5, 7)
    with torch.no_grad():
        explained = torch._dynamo.explain(attn)(x, ctx)
        compiled = torch.compile(attn, backend="eager", fullgraph=True)(x, ctx)
        eager = attn(x, ctx)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_linear", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_spatial_transformer_tokens_stay_contiguous(use_linear, layout):
    """The tokens are one contiguous (B, H*W, C) tensor (a view of a channels-last map): no block's
    LayerNorm copies them, every residual add reads unstrided operands, and the output keeps the
    input's layout. A transposed view of the map fails it (3 extra copies and 3 strided adds per
    block; 2% of SD 1.5's controlled bf16 step on the CPU, docs/benchmarks.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    st = blocks_module.SpatialTransformer(32, 2, 16, 24, depth=2, use_linear=use_linear).eval()
    randomize_(st)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=layout)
    context = torch.randn(2, 5, 24)
    seen: dict[str, list] = {"norm": [], "add": [], "copies": 0}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith("aten.native_layer_norm"):
                seen["norm"].append(args[0].is_contiguous())
            elif name.startswith("aten.add.Tensor") and args[0].dim() == 3:
                seen["add"].append(all(a.is_contiguous() for a in args[:2]))
            elif name.startswith(("aten.copy_", "aten.clone")) and args[0].dim() == 3:
                seen["copies"] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        expected = st(x.contiguous(), context)
        with Watch():
            out = st(x, context)
    assert len(seen["norm"]) == 3 * 2 and all(seen["norm"])
    assert len(seen["add"]) == 3 * 2 and all(seen["add"])
    assert seen["copies"] <= 1  # the one copy of a contiguous map into tokens
    assert out.is_contiguous(memory_format=layout)
    assert rel_err(out, expected) < 1e-6
