"""Reduced-precision inference: bf16 weights run in bf16 end to end, with no silent float32
fallbacks in the hot path; every attention takes the fused (flash) SDPA kernel, so no (L, L)
score matrix is materialised; GroupNorm keeps float32 statistics; and the pipeline's VAE dtype
policy (fp16 runs decode in fp32)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from unfog.models.clip_text import TINY_CLIP, CLIPTextEncoder
from unfog.models.presets import TINY
from unfog.models.tokenizer import CLIPTokenizer
from unfog.models.unet import UNet
from unfog.models.vae import TINY_VAE, AutoencoderKL
from unfog.nn.norm import GroupNorm
from unfog.pipelines import StableDiffusion
from unfog.pipelines.precision import resolve_vae_dtype

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import randomize_, rel_err  # noqa: E402

SDXL_LIKE = replace(TINY, num_heads=None, num_head_channels=16, use_linear_projection=True,
                    transformer_depth=(0, 2), transformer_depth_middle=2, num_classes="sequential",
                    adm_in_channels=24)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


class TensorLog(TorchDispatchMode):
    """Records the dtype and shape of every tensor every aten op produces."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, tuple(t.shape)))
        return out


def run_logged(fn):
    """fn() with only the fused SDPA kernel allowed (any other backend raises "No available
    kernel"), and the log of every tensor made on the way."""
    with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), TensorLog() as log:
        out = fn()
    return out, log.outputs


def unet_call(cfg, dtype):
    model = randomize_(UNet(cfg)).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 12, generator=g).to(dtype)  # 144 and 36 tokens: no channel count collides
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g).to(dtype)
    y = None if cfg.num_classes is None else torch.randn(2, cfg.adm_in_channels, generator=g).to(dtype)
    return lambda: model(x, torch.tensor([10.0, 900.0]), ctx, y), (12 * 12, 6 * 6, 7)


def vae_calls(dtype):
    vae = randomize_(AutoencoderKL(TINY_VAE)).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    images, latents = torch.rand(1, 3, 24, 24, generator=g).to(dtype), torch.randn(1, 4, 12, 12, generator=g).to(dtype)
    return lambda: (vae.encode(images).mean, vae.decode(latents)), (12 * 12,)


def clip_call(dtype):
    model = randomize_(CLIPTextEncoder(TINY_CLIP)).eval().to(dtype)
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, 40:] = 0
    return lambda: (model(ids), model(ids, attention_mask=mask)), (77,)


CASES = {
    "unet-sd1": lambda dt: unet_call(TINY, dt),
    "unet-sdxl": lambda dt: unet_call(SDXL_LIKE, dt),
    "vae": vae_calls,
    "clip": clip_call,
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_attention_is_fused_and_no_score_matrix_is_made(name, dtype):
    fn, lengths = CASES[name](dtype)
    _, outputs = run_logged(fn)  # raises if any attention would leave the flash kernel
    square = {(n, n) for n in lengths}
    scores = [(op, shape) for op, dt, shape in outputs if dt.is_floating_point and shape[-2:] in square]
    assert not scores, f"{name}: (L, L) attention-sized tensors were made: {scores[:5]}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_weights_compute_in_bf16(name):
    """With bf16 weights and inputs, the only float32 tensors are the small sinusoidal timestep
    embeddings (B, model_channels) and the attention kernel's row log-sum-exp."""
    fn, _ = CASES[name](torch.bfloat16)
    outs, outputs = run_logged(fn)
    for out in tree_flatten(outs)[0]:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            assert out.dtype == torch.bfloat16
    allowed = 2 * TINY.model_channels
    big = [(op, shape) for op, dt, shape in outputs
           if dt == torch.float32 and "flash_attention" not in op and torch.Size(shape).numel() > allowed]
    assert not big, f"{name}: float32 tensors in the bf16 path: {big[:5]}"


@pytest.mark.parametrize("name", ["unet-sd1", "unet-sdxl", "vae"])
def test_bf16_agrees_with_fp32(name):
    ref, _ = CASES[name](torch.float32)
    low, _ = CASES[name](torch.bfloat16)
    with torch.inference_mode():
        for a, b in zip(tree_flatten(low())[0], tree_flatten(ref())[0]):
            assert rel_err(a.float(), b) < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_groupnorm_keeps_float32_statistics(dtype, offset):
    """The fused low-precision kernel gives the float32 computation's values (within the final
    rounding), also for feature maps with a large mean, where bf16 statistics would fail."""
    g = torch.Generator().manual_seed(0)
    norm = randomize_(GroupNorm(32, 128)).to(dtype)
    x = (torch.randn(2, 128, 32, 32, generator=g) * 2 + offset).to(dtype)
    y = norm(x)
    assert y.dtype == dtype
    upcast = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    ulp = torch.finfo(dtype).eps
    assert ((y.float() - upcast).abs() <= ulp * upcast.abs().clamp_min(1.0)).all()


def test_groupnorm_mixed_dtypes_cast_to_float32():
    """bf16 input into float32 parameters (autocast): computed in float32, returned as the input."""
    norm = randomize_(GroupNorm(32, 64))
    x = torch.randn(1, 64, 8, 8).bfloat16()
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).bfloat16()
    assert torch.equal(norm(x), expected)


# ---------------------------------------------------------------- the VAE dtype policy


@pytest.mark.parametrize(
    "unet, policy, expected",
    [
        (torch.float16, "auto", torch.float32),
        (torch.bfloat16, "auto", torch.bfloat16),
        (torch.float32, "auto", torch.float32),
        (torch.float16, "unet", torch.float16),
        (torch.bfloat16, "float32", torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_vae_dtype(unet, policy, expected):
    assert resolve_vae_dtype(unet, policy) == expected


def test_resolve_vae_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="one of .*'auto'"):
        resolve_vae_dtype(torch.float16, "half")
    with pytest.raises(ValueError, match="floating dtype"):
        resolve_vae_dtype(torch.float16, torch.int8)


def tiny_pipe(dtype: torch.dtype, **kwargs) -> StableDiffusion:
    unet = randomize_(UNet(replace(TINY, context_dim=TINY_CLIP.width)), seed=1).to(dtype)
    vae = randomize_(AutoencoderKL(TINY_VAE), seed=2).to(dtype)
    text = randomize_(CLIPTextEncoder(TINY_CLIP), seed=3).to(dtype)
    return StableDiffusion(unet, vae, CLIPTokenizer.from_bpe_file(), "sd1", text_encoder=text, **kwargs)


def test_pipeline_applies_vae_dtype_policy():
    assert tiny_pipe(torch.float16).vae.dtype == torch.float32
    assert tiny_pipe(torch.float16, vae_dtype="unet").vae.dtype == torch.float16
    assert tiny_pipe(torch.bfloat16).vae.dtype == torch.bfloat16


def test_bf16_pipeline_matches_fp32():
    args = dict(steps=3, width=16, height=16, output="tensor", seed=5)
    ref = tiny_pipe(torch.float32)("a red bicycle", **args)
    out = tiny_pipe(torch.bfloat16)("a red bicycle", **args)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    diff = (out - ref).abs()  # images in [-1, 1]; a random tiny model amplifies rounding
    assert diff.mean() < 0.04 and diff.max() < 0.25, (diff.mean(), diff.max())  # seen: 0.023, 0.147


def test_cpu_pipeline_runs_channels_last():
    """On the CPU the pipeline stores conv weights channels-last (oneDNN's layout), which changes
    nothing but the order of float sums."""
    pipe = tiny_pipe(torch.float32)
    assert pipe.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    args = dict(steps=3, width=16, height=16, output="tensor", seed=5)
    out = pipe("a red bicycle", **args)
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, pipe("a red bicycle", **args), rtol=1e-4, atol=1e-4)
