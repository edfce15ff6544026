"""How the pipeline's models are laid out for inference: the VAE's dtype, and the memory format.

Which dtype the VAE runs in, given the U-Net's, is diffusers' ``force_upcast`` as one rule.

The Stable Diffusion VAE decoders can make activations beyond float16's range (65504): the SDXL
VAE overflows to inf/NaN (black or speckled images), which is why diffusers' VAE configs set
``force_upcast`` (its default) and its pipelines decode fp16 runs in float32. bfloat16 has
float32's range, so a bf16 VAE is fine. Hence the default policy, "auto": float32
when the U-Net runs in float16, else the U-Net's dtype (bf16 runs stay bf16, fp32 stay fp32).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

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
