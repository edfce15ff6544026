"""Named backbone configurations: the official Stable Diffusion U-Nets, small U-Nets of our own,
and the DiTs (``models/dit.py``: the official DiT-XL/2 sizes and ours).

The official presets reproduce the tensor layout of the released checkpoints exactly (tested
against ``shared/fixtures/checkpoint-layouts``). SD 2.x uses one network for its eps (512px)
and v-prediction (768px) checkpoints: the prediction type belongs to the denoiser wrapper.
"""

from __future__ import annotations

from dataclasses import replace

from unfog.models.dit import DIT_SHAPES, DIT_TINY, DIT_XL_2_256, DIT_XL_2_512, DiTConfig
from unfog.models.unet import UNetConfig

# Stable Diffusion 1.x (CompVis v1-inference.yaml): 8 heads, 1x1-conv projections, CLIP ViT-L/14.
SD15 = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    transformer_depth=(1, 1, 1, 0),
    transformer_depth_middle=1,
    num_heads=8,
    context_dim=768,
)
# Inpainting: the input is cat(noisy latent 4, mask 1, masked-image latent 4).
SD15_INPAINT = replace(SD15, in_channels=9)

# Stable Diffusion 2.x (v2-inference[-v].yaml): 64-channel heads, linear projections, OpenCLIP ViT-H.
SD2 = replace(SD15, num_heads=None, num_head_channels=64, context_dim=1024, use_linear_projection=True)
SD2_INPAINT = replace(SD2, in_channels=9)

# SDXL base (sd_xl_base.yaml): 3 levels, transformer depth (0, 2, 10), context = CLIP-L + bigG
# penultimate features (768 + 1280); y = pooled bigG (1280) + 6 size/crop embeddings x 256.
SDXL_BASE = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    num_heads=None,
    num_head_channels=64,
    context_dim=2048,
    use_linear_projection=True,
    num_classes="sequential",
    adm_in_channels=2816,
)
# SDXL refiner (sd_xl_refiner.yaml): context = bigG only (1280); y = pooled bigG (1280)
# + 4 size/crop embeddings + 1 aesthetic-score embedding, x 256.
SDXL_REFINER = replace(
    SDXL_BASE,
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4,
    context_dim=1280,
    adm_in_channels=2560,
)

# For tests: SD1-shaped (cross-attention, conv projections, fixed heads), about 1M params.
TINY = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    transformer_depth=(1, 1),
    transformer_depth_middle=1,
    num_heads=2,
    context_dim=32,
)

# Pixel-space, class-conditional model for 1 x 16 x 16 digits: ADM-style (scale-shift norm),
# self-attention at the 8x8 and 4x4 levels, 10 classes.
DIGITS = UNetConfig(
    in_channels=1,
    out_channels=1,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    transformer_depth=(0, 1, 1),
    transformer_depth_middle=1,
    num_heads=None,
    num_head_channels=32,
    context_dim=None,
    num_classes=10,
    use_scale_shift_norm=True,
    dropout=0.1,
)

# Latent text-to-image model for 64 x 64 `shapes` images (4 x 16 x 16 latents of an f4 VAE):
# SD2/XL-style cross-attention (linear projections, 32-wide heads) at the 8x8 and 4x4 levels and
# in the middle; the context width is the small text encoder's (set by the trainer).
SHAPES = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    transformer_depth=(0, 1, 1),
    transformer_depth_middle=1,
    num_heads=None,
    num_head_channels=32,
    context_dim=128,
    use_linear_projection=True,
)

PRESETS: dict[str, UNetConfig | DiTConfig] = {
    "SD15": SD15,
    "SD15_INPAINT": SD15_INPAINT,
    "SD2": SD2,
    "SD2_INPAINT": SD2_INPAINT,
    "SDXL_BASE": SDXL_BASE,
    "SDXL_REFINER": SDXL_REFINER,
    "TINY": TINY,
    "DIGITS": DIGITS,
    "SHAPES": SHAPES,
    "DIT_XL_2_256": DIT_XL_2_256,
    "DIT_XL_2_512": DIT_XL_2_512,
    "DIT_SHAPES": DIT_SHAPES,
    "DIT_TINY": DIT_TINY,
}


def get_preset(name: str) -> UNetConfig | DiTConfig:
    """The backbone config named ``name`` (case-insensitive), e.g. ``get_preset("sdxl_base")``: a
    U-Net's, or a DiT's for the names starting with ``DIT_``."""
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; valid names: {', '.join(PRESETS)}") from None
