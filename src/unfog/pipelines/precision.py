"""How the pipeline's models are laid out for inference: the VAE's dtype, and the memory format.

Which dtype the VAE runs in, given the U-Net's, is diffusers' ``force_upcast`` as one rule.

The Stable Diffusion VAE decoders can make activations beyond float16's range (65504): the SDXL
VAE overflows to inf/NaN (black or speckled images), which is why diffusers' VAE configs set
``force_upcast`` (its default) and its pipelines decode fp16 runs in float32. bfloat16 has
float32's range, so a bf16 VAE is fine. Hence the default policy, "auto": float32
when the U-Net runs in float16, else the U-Net's dtype (bf16 runs stay bf16, fp32 stay fp32).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from ..choices import check_choice

VAEDtypeName = Literal["auto", "unet", "float32", "bfloat16", "float16"]
VAEDtype = VAEDtypeName | torch.dtype
_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the short names options use


def resolve_vae_dtype(unet_dtype: torch.dtype, vae_dtype: VAEDtype = "auto") -> torch.dtype:
    """The VAE's dtype for a U-Net in ``unet_dtype`` under the policy ``vae_dtype``.

    "auto": float32 for a float16 U-Net, else ``unet_dtype``; "unet": ``unet_dtype`` whatever it
    is (float16 VAEs can overflow); a dtype or its name ("float32", "bfloat16", "float16"): that.
    """
    if isinstance(vae_dtype, torch.dtype):
        if vae_dtype not in _NAMED.values():
            raise ValueError(f"vae_dtype must be a floating dtype of {tuple(_NAMED)}, got {vae_dtype}")
        return vae_dtype
    if vae_dtype == "auto":
        return torch.float32 if unet_dtype == torch.float16 else unet_dtype
    if vae_dtype == "unet":
        return unet_dtype
    if vae_dtype in _NAMED:
        return _NAMED[vae_dtype]
    raise ValueError(f"vae_dtype must be a torch dtype or one of {get_args(VAEDtypeName)}, got {vae_dtype!r}")


def use_device_layout(*modules: nn.Module | None) -> None:
    """Store the convolution weights of ``modules`` (in place) channels-last on the CPU, and in the
    default contiguous layout elsewhere.

    On the CPU, oneDNN computes bf16 convolutions in NHWC: given NCHW tensors it converts the input
    on every call, a strided copy that cost 46% of a bf16 VAE decode at 256 px (1.3 of 2.9 s, one
    core). With channels-last weights the first convolution returns a channels-last tensor and
    every later op keeps that layout (GroupNorm, SiLU, sums, nearest upsampling and
    concatenation all have channels-last kernels), so nothing is converted: the decode takes
    1.1 s, and the U-Net's transformer blocks get their (B, HW, C) tokens without a copy.
    On CUDA GroupNorm wants NCHW, so there the default layout is kept.
    """
    converted_on_cpu = False
    for module in modules:
        param = None if module is None else next(module.parameters(), None)
        if param is not None:
            cpu = param.device.type == "cpu"
            module.to(memory_format=torch.channels_last if cpu else torch.contiguous_format)
            converted_on_cpu |= cpu
    if converted_on_cpu:
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand memory that freed tensors left in the C heap back to the OS (glibc's ``malloc_trim``).
    Converting a model's conv weights frees the old copies one by one; glibc keeps such chunks
    for reuse, so without this the process stays larger by up to the converted weights' size
    (SD 1.5 in bf16: 2.2 GB resident after loading instead of 1.8). No-op off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def available_devices() -> list[str]:
    """The devices this torch build can run on now: "cpu", then "cuda" / "cuda:N" and "mps" where present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        devices += ["cuda"] + ([f"cuda:{i}" for i in range(count)] if count > 1 else ["cuda:0"])
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str | None = None) -> str:
    """``name`` if this torch can run on it (None: "cuda" when available, else "cpu"); otherwise a
    one-line ValueError naming the devices it has (a CPU-only build has no CUDA, whatever the machine)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    devices = available_devices()
    if name in devices or (name.startswith("cpu") and _parses(name)):
        return name
    build = torch.__version__ + ("" if torch.version.cuda else ", a build without CUDA")
    what = "not a device name" if not _parses(name) else "not available"
    raise ValueError(f"device {name!r} is {what}; this torch ({build}) has: {', '.join(devices)}")


def _parses(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


# ---- the models' dtype: "auto" -------------------------------------------------------------------------

DTYPE_NAMES = ("auto", *DTYPES)  # what --dtype and Job.dtype accept
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of native bf16 matmuls
_PROBE_SIDE = 512  # the probe's square matmul: 0.27 GFLOP, under a millisecond with AMX


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _matmul_seconds(dtype: torch.dtype, repeats: int = 3) -> float:
    a = torch.randn(_PROBE_SIDE, _PROBE_SIDE, generator=torch.Generator().manual_seed(0)).to(dtype)
    a @ a  # warm-up: the kernel's first call picks and packs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return min(times)


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """Whether bf16 beats float32 on this CPU. With AMX (``amx_bf16``) it does, about 5x in large
    matmuls. Without ``amx_bf16`` or ``avx512_bf16``, torch emulates bf16 and it does not: 5x
    slower on AVX-512 machines, 100x on an AVX2 one (docs/benchmarks.md). With ``avx512_bf16``
    alone the flags cannot tell, so a 512 x 512 matmul is timed once in each dtype (a few ms) and
    bf16 must be at least 20% faster."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True
    if "avx512_bf16" not in flags:
        return False
    return _matmul_seconds(torch.bfloat16) < 0.8 * _matmul_seconds(torch.float32)


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """``--dtype auto``: float16 on CUDA (the VAE then decodes in float32, ``resolve_vae_dtype``),
    bfloat16 on a CPU where it is faster than float32 (``cpu_bf16_is_faster``), else float32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_bf16_is_faster():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A ``--dtype`` name ("auto", "fp32", "bf16", "fp16") on ``device`` -> the torch dtype."""
    check_choice("dtype", name, DTYPE_NAMES)
    return auto_dtype(device) if name == "auto" else DTYPES[name]


def training_autocast(precision: str, device: str | torch.device) -> bool:
    """Whether a training run of ``precision`` ("auto", "bf16", "fp32") computes under bf16
    autocast: "auto" on a CPU where bf16 beats float32 (``cpu_bf16_is_faster``), or on a CUDA
    device that has bf16 (Ampere and later); the weights and optimiser stay float32."""
    check_choice("precision", precision, ("auto", "bf16", "fp32"))
    if precision != "auto":
        return precision == "bf16"
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_bf16_is_faster()


def slow_dtype_warning(dtype: torch.dtype, device: str | torch.device) -> str | None:
    """A one-line warning for a half-precision dtype on a CPU that emulates it, else None."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and cpu_bf16_is_faster():
        return None
    if dtype == torch.float16 and "amx_fp16" in cpu_flags():
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    wanted, flags = (*BF16_FLAGS, "amx_fp16"), cpu_flags()
    have = ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)
    return f"{name} on this CPU ({have}) runs slower than fp32, up to 100x; use --dtype auto or fp32"
