"""unfog: a from-scratch, readable implementation of the diffusion-model stack.

    import unfog
    pipe = unfog.load("v1-5-pruned-emaonly.safetensors")   # or a diffusers folder
    image = pipe("a lighthouse at dusk", steps=20, seed=1)[0]

``import unfog`` stays light: torch and the models are imported on the first ``unfog.load``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from .models.controlnet import ControlNet
    from .models.unet import UNet
    from .pipelines.stable_diffusion import StableDiffusion

__version__ = "0.1.0"
__all__ = ["load", "load_controlnet"]


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    family: str | None = None,
    prediction: str | None = None,
    use_ema: bool = False,
    vae: str | Path | None = None,
    compile: bool | str = False,
) -> StableDiffusion:
    """A Stable Diffusion pipeline (SD 1.x, 2.x, SDXL base or refiner) from an official single file
    (``.safetensors``, ``.ckpt``) or a diffusers folder, its family detected from the weights.

    Its parts are plain modules: ``pipe.unet(x, timesteps, context, y=None)``, ``pipe.vae``,
    ``pipe.text_encoder`` (and ``pipe.text_encoder_2`` for SDXL), ``pipe.tokenizer``; calling
    ``pipe(prompt, ...)`` draws images (see ``StableDiffusion.__call__``).

    dtype: of every model, whatever the file stores (None: torch.float32; "auto": bfloat16 on a CPU
        where it is faster than float32, float16 on CUDA, else float32; or "fp32", "bf16", "fp16").
        device: where they go.
    family: the checkpoint family when detection cannot tell (e.g. "SD15", "SD2", "SDXL_BASE";
        ``unfog.checkpoint.FAMILIES``). prediction: "eps" | "v" | "x0", overriding the family's
        (SD 2.x 512-base files need "eps"). use_ema: the U-Net's EMA weights of a file with both.
    vae: another VAE to encode and decode with (a VAE file, a checkpoint, a diffusers AutoencoderKL
        folder or an unfog autoencoder), as A1111's SD VAE setting; ``pipe.load_vae`` swaps it later.
    compile: run the U-Net and VAE decoder through ``torch.compile`` (CUDA graphs on CUDA): True or
        "auto" falls back to eager with a warning where compiling is not possible, "strict" raises
        (``pipe.compile``; docs/generate.md).

    unfog's own pixel models are not accepted: a ValueError points to ``PixelDiffusion.load``.
    """
    import torch

    from .pipelines.precision import resolve_dtype
    from .pipelines.stable_diffusion import StableDiffusion

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    pipe = StableDiffusion.load(path, dtype=torch.float32 if dtype is None else dtype, device=device, family=family,
                                prediction=prediction, use_ema=use_ema)
    if vae is not None:
        pipe.load_vae(vae)
    if compile:
        pipe.compile("auto" if compile is True else compile)
    return pipe


def load_controlnet(
    path: str | Path,
    base: UNet | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    global_pool: bool | None = None,
) -> ControlNet:
    """A ControlNet (SD 1.x, 2.x or SDXL) from an official single file (``control_model.`` prefix or
    none; fp16 or fp32) or a diffusers folder. Calling it, ``(x, timesteps, context, hint, y=None)``,
    gives the residuals that ``pipe.unet(x, timesteps, context, y, control=residuals)`` adds.

    base: the U-Net a ``difference`` file was made against (usually SD 1.5's, e.g. ``pipe.unet``),
        whose weights are added back; refused for other files. dtype: of the module (None:
        torch.float32). global_pool: whether its residuals are averaged over the image (the v1.1
        shuffle model); None: from a diffusers config, else "shuffle" in an SD 1.x / 2.x file's
        name, as sd-webui-controlnet decides. See docs/controlnet.md.
    """
    import torch

    from .checkpoint.controlnet import load_controlnet as load
    from .pipelines.precision import use_device_layout

    model = load(path, base=base, dtype=torch.float32 if dtype is None else dtype, global_pool=global_pool).to(device)
    use_device_layout(model)  # as the pipeline lays out its U-Net: channels-last convolutions on the CPU
    return model
