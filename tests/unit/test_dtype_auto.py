"""``--dtype auto`` (pipelines.precision): float16 on CUDA, bf16 on a CPU where bf16 beats float32,
else float32. The choice from the CPU flags (AMX: bf16; neither AMX nor AVX-512 BF16: float32; AVX-512
BF16 alone: a timed probe) is tested with the flags and the probe replaced; the choice on this
machine is checked against matmul timings taken here; a slow explicit dtype warns."""

from __future__ import annotations

import functools
import time

import pytest
import torch

import unfog
from unfog.cli import DTYPE_CHOICES
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.jobs import Job, ModelCache, generate
from unfog.pipelines import precision
from unfog.pipelines.outputs import Settings

REAL_CHECK = precision.cpu_bf16_is_faster  # tests/conftest.py replaces it for every test not marked real_cpu


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU's flags and the probe's two timings (bf16, fp32); the probe's calls are counted."""
    probes = []

    def make(flags, bf16_s=None, fp32_s=None):
        monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(precision, "cpu_bf16_is_faster", functools.cache(REAL_CHECK.__wrapped__))  # a fresh cache

        def seconds(dtype, repeats=3):
            probes.append(dtype)
            assert bf16_s is not None, "the flags decide: no probe expected"
            return bf16_s if dtype == torch.bfloat16 else fp32_s

        monkeypatch.setattr(precision, "_matmul_seconds", seconds)
        return probes

    return make


@pytest.mark.parametrize("flags, timings, expected", [
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, (None, None), torch.bfloat16),  # AMX: bf16, no probe
    ({"avx2", "fma"}, (None, None), torch.float32),  # emulated bf16 (100x slower on an AVX2 EPYC)
    ({"avx512f"}, (None, None), torch.float32),  # AVX-512 without BF16: about 5x slower
    ({"avx512f", "avx512_bf16"}, (0.5, 1.0), torch.bfloat16),  # the probe: bf16 2x faster
    ({"avx512f", "avx512_bf16"}, (0.9, 1.0), torch.float32),  # only 10% faster: not worth bf16's rounding
    ({"avx512f", "avx512_bf16"}, (3.0, 1.0), torch.float32),
])
def test_auto_on_the_cpu_follows_the_flags_and_the_probe(cpu, flags, timings, expected):
    probes = cpu(flags, *timings)
    assert precision.auto_dtype("cpu") == expected
    assert precision.resolve_dtype("auto", "cpu") == expected
    assert len(probes) == (2 if timings[0] is not None else 0)


def test_auto_is_float16_on_cuda_and_named_dtypes_are_kept(cpu):
    cpu({"avx2"})
    assert precision.auto_dtype("cuda") == torch.float16 and precision.auto_dtype("cuda:1") == torch.float16
    assert precision.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert precision.resolve_dtype("fp16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp64'; valid choices: auto, fp32, bf16, fp16"):
        precision.resolve_dtype("fp64", "cpu")
    assert DTYPE_CHOICES == precision.DTYPE_NAMES  # the CLI's list, kept free of torch imports


def test_slow_dtypes_warn_on_a_cpu_that_emulates_them(cpu):
    cpu({"avx2", "fma"})
    message = precision.slow_dtype_warning(torch.bfloat16, "cpu")
    assert message.startswith("bf16 on this CPU (none of amx_bf16, avx512_bf16, amx_fp16) runs slower than fp32")
    assert "--dtype auto or fp32" in message
    assert precision.slow_dtype_warning(torch.float16, "cpu").startswith("fp16 on this CPU")
    assert precision.slow_dtype_warning(torch.float32, "cpu") is None
    assert precision.slow_dtype_warning(torch.float16, "cuda") is None
    cpu({"amx_bf16", "avx512_bf16"})
    assert precision.slow_dtype_warning(torch.bfloat16, "cpu") is None
    assert "(amx_bf16, avx512_bf16)" in precision.slow_dtype_warning(torch.float16, "cpu")


def _matmul_s(dtype: torch.dtype) -> float:
    a = torch.randn(384, 384).to(dtype)
    a @ a
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.real_cpu
def test_auto_on_this_machine_never_picks_a_slower_bf16():
    """The oracle: matmul timings taken here, by this test, in both dtypes (the probe's margins are
    wide: bf16 is 5x faster with AMX and 5-100x slower where it is emulated)."""
    REAL_CHECK.cache_clear()
    chosen = precision.auto_dtype("cpu")
    bf16, fp32 = _matmul_s(torch.bfloat16), _matmul_s(torch.float32)
    if chosen == torch.bfloat16:
        assert bf16 < fp32, (bf16, fp32)
    else:
        assert chosen == torch.float32 and bf16 > 0.5 * fp32, (bf16, fp32)


def test_jobs_and_load_resolve_auto_and_an_explicit_slow_dtype_warns(cpu):
    cpu({"avx2"})
    model = default_model_path(DEFAULT_TEXT_MODEL)
    assert unfog.load(model, dtype="auto").unet.input_blocks[0][0].weight.dtype == torch.float32
    cache, warnings = ModelCache(), []
    auto = Job("txt2img", Settings(prompt="a red circle", steps=1, seed=1, width=64, height=64), model)
    assert auto.dtype == "auto" and cache.load_options(auto)["dtype"] == torch.float32
    list(generate(auto, cache, warnings.append))
    assert warnings == []
    bf16 = Job("txt2img", Settings(prompt="a red circle", steps=1, seed=1, width=64, height=64), model, dtype="bf16")
    list(generate(bf16, cache, warnings.append))
    assert len(warnings) == 1 and warnings[0].startswith("bf16 on this CPU")
    cpu({"amx_bf16"})
    assert cache.load_options(auto)["dtype"] == torch.bfloat16


def test_training_precision_auto_uses_bf16_autocast_only_where_it_is_fast(cpu, tmp_path):
    from unfog.training import load_config, make_trainer

    cpu({"avx2"})
    assert not precision.training_autocast("auto", "cpu")
    assert precision.training_autocast("bf16", "cpu") and not precision.training_autocast("fp32", "cpu")
    config = load_config(None, ["task=lora", "data=shapes", "image_size=32", "data_size=2", "batch_size=2",
                                f"out_dir={tmp_path}", "lora.rank=2", "lora.alpha=2"])
    assert config.precision == "auto" and not make_trainer(config, "cpu").bf16_autocast
    cpu({"amx_bf16"})
    assert precision.training_autocast("auto", "cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid choices: auto, bf16, fp32"):
        precision.training_autocast("fp16", "cpu")
