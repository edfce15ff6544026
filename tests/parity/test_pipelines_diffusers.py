"""``StableDiffusion`` against diffusers' pipelines on the same tiny random models, fp32.

diffusers' pipelines are built from diffusers / transformers modules with random weights; ours
hold the same weights: our U-Net and VAE are written in the official LDM names and converted
into diffusers' with diffusers' own single-file converters (as ``tests/unit/test_unet.py`` and
``test_vae_diffusers.py`` do), the CLIP encoders go the other way as in
``test_conditioning_diffusers.py``. Both sides get the same prompt, the same scheduler settings
(Stable Diffusion's: scaled_linear 0.00085..0.012, leading spacing, steps_offset 1) and the same
start: ``latents=`` for txt2img, and for img2img / inpainting the same seed, which our pipeline
spends in diffusers' order (VAE sample of the image, the noise, VAE sample of the masked image).
Latents and images agree within 1e-4 relative error (max |a - b| / max |b|).

Settings are chosen where both conventions are defined the same (docs/samplers.md lists the
differences): Euler (and DDIM with ``set_alpha_to_one=True``, ``clip_sample=False``, so that its
last step reaches sigma 0 as ours does), guidance scales > 1 (diffusers turns guidance off at
<= 1), non-empty negative prompts for the refiner, and 4-channel inpainting at strength < 1
(at strength 1 diffusers' first model call sees pure noise in the kept region; ours sees the
image noised to sigma_max).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from unfog.models.clip_text import CLIPTextEncoder
from unfog.models.presets import TINY
from unfog.models.tokenizer import CLIPTokenizer
from unfog.models.unet import UNet
from unfog.models.vae import TINY_VAE, AutoencoderKL
from unfog.pipelines import StableDiffusion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import randomize_, rel_err, write_tokenizer_folder  # noqa: E402
from oracles import (  # noqa: E402
    clip_pair,
    diffusers_twin,
    load_into_diffusers,
    vae_to_diffusers,
    with_text_model_alias,
)

PROJ = 40  # bigG-like projection width (pooled text embedding)
RTOL = 1e-4
SIZE = 16  # pixels; TINY_VAE halves it: 8 x 8 latents
STEPS = 6
PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1)
PRED = {"eps": "epsilon", "v": "v_prediction"}

SD1_UNET = replace(TINY, context_dim=32)  # CLIP-L-like encoder of width 32
SD2_UNET = replace(SD1_UNET, num_heads=None, num_head_channels=16, use_linear_projection=True)
SDXL_UNET = replace(TINY, context_dim=32 + 48, use_linear_projection=True, num_classes="sequential",
                    adm_in_channels=PROJ + 6 * 256)
REFINER_UNET = replace(SDXL_UNET, context_dim=48, adm_in_channels=PROJ + 5 * 256)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# --- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = write_tokenizer_folder(tmp_path_factory.mktemp("clip_tokenizer"))
    hf = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)  # pads with EOS
    hf_2 = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")  # id 0
    return hf, hf_2, CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def clip_l():
    ref, ours = clip_pair(32, 2, "quick_gelu", None, seed=0)
    return with_text_model_alias(ref), ours


@pytest.fixture(scope="module")
def big_g():
    return clip_pair(48, 2, "gelu", PROJ, seed=1)


def unet_pair(cfg, seed: int, **extra):
    ours = randomize_(UNet(cfg), seed=seed).eval()
    theirs = diffusers_twin(cfg, sample_size=SIZE // 2, **extra)
    load_into_diffusers(ours, theirs)
    return theirs, ours


def sdxl_unet_pair(cfg, seed: int):
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return unet_pair(cfg, seed, **extra)


def vae_pair(scaling_factor: float = 0.18215):
    ours = randomize_(AutoencoderKL(replace(TINY_VAE, scaling_factor=scaling_factor)), seed=3).eval()
    return vae_to_diffusers(ours), ours


def euler(prediction: str = "eps") -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(prediction_type=PRED[prediction], **SD_CONFIG)


def sd1(clip_l, tokenizers, *, in_channels=4, prediction="eps", scheduler=None):
    unet, ours_unet = unet_pair(replace(SD1_UNET, in_channels=in_channels), seed=2)
    vae, ours_vae = vae_pair()
    parts = dict(vae=vae, text_encoder=clip_l[0], tokenizer=tokenizers[0], unet=unet,
                 scheduler=scheduler or euler(prediction), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    ours = StableDiffusion(ours_unet, ours_vae, tokenizers[2], "sd1", text_encoder=clip_l[1], prediction=prediction)
    return parts, ours


def sdxl_base(clip_l, big_g, tokenizers):
    unet, ours_unet = sdxl_unet_pair(SDXL_UNET, seed=4)
    vae, ours_vae = vae_pair(0.13025)
    theirs = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l[0], text_encoder_2=big_g[0],
                                       tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                       scheduler=euler(), add_watermarker=False)
    ours = StableDiffusion(ours_unet, ours_vae, tokenizers[2], "sdxl", text_encoder=clip_l[1], text_encoder_2=big_g[1])
    return theirs, ours


def sdxl_refiner(big_g, tokenizers):
    unet, ours_unet = sdxl_unet_pair(REFINER_UNET, seed=5)
    vae, ours_vae = vae_pair(0.13025)
    theirs = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=big_g[0], tokenizer=None,
                                              tokenizer_2=tokenizers[1], unet=unet, scheduler=euler(),
                                              requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                              add_watermarker=False)
    ours = StableDiffusion(ours_unet, ours_vae, tokenizers[2], "sdxl_refiner", text_encoder_2=big_g[1])
    return theirs, ours


# --- inputs --------------------------------------------------------------------------------------


def noise(batch: int = 1, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


def image01(seed: int = 8) -> torch.Tensor:
    """An image in [0, 1] (diffusers' tensor convention); ours takes 2 x - 1."""
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def square_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 3:11, 5:14] = 1.0  # paint a rectangle, keep the rest
    return mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = rel_err(ours, theirs)
    assert err <= RTOL, f"relative error {err:.2e}"


def to01(images: torch.Tensor) -> torch.Tensor:
    return (images + 1) / 2


# --- SD 1.x: txt2img ---------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, rescale", [("eps", 0.0), ("v", 0.7)])
@torch.no_grad()
def test_txt2img(clip_l, tokenizers, prediction, rescale):
    parts, ours = sd1(clip_l, tokenizers, prediction=prediction)
    pipe = StableDiffusionPipeline(**parts)
    args = dict(num_inference_steps=STEPS, guidance_scale=7.5, guidance_rescale=rescale, height=SIZE, width=SIZE)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, latents=noise(), output_type="latent", **args).images
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, guidance_rescale=rescale, latents=noise(),
                output="latent")
    assert_close(mine, theirs)
    images = pipe(PROMPT, negative_prompt=NEGATIVE, latents=noise(), output_type="pt", **args).images
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, guidance_rescale=rescale, latents=noise(),
                output="tensor")
    assert_close(to01(mine), images)


@torch.no_grad()
def test_txt2img_batch(clip_l, tokenizers):
    """Two prompts x 2 images each: diffusers' num_images_per_prompt is our batch_size."""
    parts, ours = sd1(clip_l, tokenizers)
    prompts = [PROMPT, "a watercolor of a lighthouse"]
    theirs = StableDiffusionPipeline(**parts)(prompts, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS,
                                              guidance_scale=5.0, num_images_per_prompt=2, latents=noise(4),
                                              height=SIZE, width=SIZE, output_type="latent").images
    mine = ours(prompts, [NEGATIVE] * 2, steps=STEPS, cfg_scale=5.0, batch_size=2, latents=noise(4), output="latent")
    assert_close(mine, theirs)


@torch.no_grad()
def test_txt2img_clip_skip_without_guidance(clip_l, tokenizers):
    """diffusers' clip_skip=1 is our 2 (the penultimate layer). Without guidance (scale 1), since
    diffusers encodes the negative prompt without clip_skip (test_conditioning_diffusers.py)."""
    parts, ours = sd1(clip_l, tokenizers)
    theirs = StableDiffusionPipeline(**parts)(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, clip_skip=1,
                                              latents=noise(), height=SIZE, width=SIZE, output_type="latent").images
    mine = ours(PROMPT, steps=STEPS, cfg_scale=1.0, clip_skip=2, latents=noise(), output="latent")
    assert_close(mine, theirs)


@torch.no_grad()
def test_txt2img_ddim(clip_l, tokenizers):
    scheduler = DDIMScheduler(set_alpha_to_one=True, clip_sample=False, **SD_CONFIG)
    parts, ours = sd1(clip_l, tokenizers, scheduler=scheduler)
    theirs = StableDiffusionPipeline(**parts)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                                              guidance_scale=7.5, latents=noise(), height=SIZE, width=SIZE,
                                              output_type="latent").images
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, sampler="ddim", cfg_scale=7.5, latents=noise(), output="latent")
    assert_close(mine, theirs)


@torch.no_grad()
def test_sd2_v_txt2img(tokenizers):
    """SD 2.x: an OpenCLIP-like encoder (gelu, padding with id 0) read at its penultimate layer, a
    v-prediction U-Net with linear projections and 16-channel heads. diffusers' SD 2 text_encoder
    folders drop the encoder's last layer and read the last remaining one, so ours is diffusers'
    encoder plus one (random) layer on top, which the penultimate readout never reaches; and
    diffusers' encoder alone, with ``trained_layers`` one more (as the folder loader sets it for
    ViT-H), reads the same layer."""
    ref, shorter = clip_pair(32, 2, "gelu", None, seed=9)
    text = randomize_(CLIPTextEncoder(replace(shorter.config, layers=shorter.config.layers + 1)), seed=10).eval()
    missing, unexpected = text.load_state_dict(shorter.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(f"encoder.layers.{shorter.config.layers}.") for k in missing)
    unet, ours_unet = unet_pair(SD2_UNET, seed=11)
    vae, ours_vae = vae_pair()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ref, tokenizer=tokenizers[1], unet=unet, scheduler=euler("v"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = StableDiffusion(ours_unet, ours_vae, tokenizers[2], "sd2", text_encoder=text, prediction="v")
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, latents=noise(),
                  height=SIZE, width=SIZE, output_type="pt").images
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, latents=noise(), output="tensor")
    assert_close(to01(mine), theirs)
    # diffusers' encoder itself, as unfog loads such a folder (its depth recorded as one more layer)
    as_loaded = CLIPTextEncoder(replace(shorter.config, trained_layers=shorter.config.layers + 1)).eval()
    as_loaded.load_state_dict(shorter.state_dict())
    loaded = StableDiffusion(ours_unet, ours_vae, tokenizers[2], "sd2", text_encoder=as_loaded, prediction="v")
    assert torch.equal(loaded(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=7.5, latents=noise(), output="tensor"), mine)


# --- SD 1.x: img2img and inpainting --------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.6, 1.0])
@torch.no_grad()
def test_img2img(clip_l, tokenizers, strength):
    parts, ours = sd1(clip_l, tokenizers)
    theirs = StableDiffusionImg2ImgPipeline(**parts)(PROMPT, image=image01(), strength=strength,
                                                     negative_prompt=NEGATIVE, num_inference_steps=10,
                                                     guidance_scale=7.5, generator=gen(11), output_type="pt").images
    mine = ours(PROMPT, NEGATIVE, steps=10, cfg_scale=7.5, init_image=2 * image01() - 1, strength=strength,
                seed=11, output="tensor")
    assert_close(to01(mine), theirs)


@pytest.mark.parametrize("in_channels, strength", [(9, 1.0), (9, 0.7), (4, 0.7)])
@torch.no_grad()
def test_inpaint(clip_l, tokenizers, in_channels, strength):
    parts, ours = sd1(clip_l, tokenizers, in_channels=in_channels)
    pipe = StableDiffusionInpaintPipeline(**parts)
    args = dict(image=image01(), mask_image=square_mask(), strength=strength, height=SIZE, width=SIZE,
                negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5)
    theirs = pipe(PROMPT, generator=gen(12), output_type="latent", **args).images
    kwargs = dict(steps=STEPS, cfg_scale=7.5, init_image=2 * image01() - 1, mask=square_mask(), strength=strength,
                  seed=12)
    mine = ours(PROMPT, NEGATIVE, output="latent", **kwargs)
    assert_close(mine, theirs)
    images = pipe(PROMPT, generator=gen(12), output_type="pt", **args).images
    assert_close(to01(ours(PROMPT, NEGATIVE, output="tensor", **kwargs)), images)


@torch.no_grad()
def test_inpaint_4_channel_keeps_the_image_outside_the_mask(clip_l, tokenizers):
    """The blend leaves the kept region at the init latents exactly (a VAE posterior mean here)."""
    _, ours = sd1(clip_l, tokenizers)
    init = 2 * image01() - 1
    latents = ours(PROMPT, NEGATIVE, steps=STEPS, init_image=init, mask=square_mask(), strength=0.7, seed=1,
                   encode="mean", output="latent")
    known = ours.vae.encode(init).mean * ours.vae.config.scaling_factor
    keep = torch.nn.functional.interpolate(square_mask(), size=(SIZE // 2, SIZE // 2)) < 0.5
    assert torch.allclose(latents[keep.expand_as(latents)], known[keep.expand_as(known)], atol=1e-5)


# --- SDXL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("negative", [NEGATIVE, None])
@torch.no_grad()
def test_sdxl_txt2img(clip_l, big_g, tokenizers, negative):
    """With no negative prompt both sides use zeros for it (diffusers' force_zeros_for_empty_prompt)."""
    theirs_pipe, ours = sdxl_base(clip_l, big_g, tokenizers)
    sizes = dict(original_size=(64, 48), crops_coords_top_left=(4, 0), target_size=(SIZE, SIZE))
    theirs = theirs_pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=6.0,
                         latents=noise(), height=SIZE, width=SIZE, output_type="pt", **sizes).images
    mine = ours(PROMPT, negative or "", steps=STEPS, cfg_scale=6.0, latents=noise(), output="tensor", **sizes)
    assert_close(to01(mine), theirs)


@torch.no_grad()
def test_sdxl_refiner_img2img(big_g, tokenizers):
    theirs_pipe, ours = sdxl_refiner(big_g, tokenizers)
    theirs = theirs_pipe(PROMPT, image=image01(), strength=0.5, negative_prompt=NEGATIVE, num_inference_steps=10,
                         guidance_scale=5.0, aesthetic_score=7.0, negative_aesthetic_score=2.0, generator=gen(13),
                         output_type="pt").images
    mine = ours(PROMPT, NEGATIVE, steps=10, cfg_scale=5.0, init_image=2 * image01() - 1, strength=0.5, seed=13,
                aesthetic_score=7.0, negative_aesthetic_score=2.0, output="tensor")
    assert_close(to01(mine), theirs)


@pytest.mark.parametrize("switch", [0.8, 0.55])
@torch.no_grad()
def test_sdxl_base_to_refiner_hand_off(clip_l, big_g, tokenizers, switch):
    base_pipe, base = sdxl_base(clip_l, big_g, tokenizers)
    refiner_pipe, refiner = sdxl_refiner(big_g, tokenizers)
    steps = 10
    handed = base_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=6.0,
                       latents=noise(), height=SIZE, width=SIZE, denoising_end=switch, output_type="latent").images
    mine = base(PROMPT, NEGATIVE, steps=steps, cfg_scale=6.0, latents=noise(), denoising_end=switch,
                output="latent")
    assert_close(mine, handed)
    theirs = refiner_pipe(PROMPT, image=handed, negative_prompt=NEGATIVE, num_inference_steps=steps,
                          guidance_scale=6.0, denoising_start=switch, output_type="pt").images
    final = refiner(PROMPT, NEGATIVE, steps=steps, cfg_scale=6.0, latents=mine, denoising_start=switch,
                    output="tensor")
    assert_close(to01(final), theirs)
