"""diffusers folders load through our conversion tables and compute what diffusers computes.

diffusers itself writes the folders: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
built from small random ``UNet2DConditionModel``, ``AutoencoderKL``, transformers CLIP text
models and tokenizers, then ``save_pretrained`` (the SDXL-like one in fp16 as ``*.fp16.*``
variants). We load the folder and compare every module's outputs with the diffusers module it
came from (relative error <= 1e-4 in float32). On the meta device, the published configs of the
real models map to our presets, and their full-size diffusers state dicts convert name for name.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import transformers

from unfog.checkpoint.convert import convert_diffusers_unet, convert_diffusers_vae
from unfog.checkpoint.detect import SchedulerConfig
from unfog.checkpoint.diffusers_folder import unet_config_from_diffusers, vae_config_from_diffusers
from unfog.checkpoint.loader import load_components
from unfog.models.presets import SD2, SD2_INPAINT, SD15, SD15_INPAINT, SDXL_BASE, SDXL_REFINER
from unfog.models.unet import UNet
from unfog.models.vae import SD_VAE, AutoencoderKL
from unfog.nn.embeddings import timestep_embedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
from model_checks import randomize_, rel_err, write_tokenizer_folder  # noqa: E402

RTOL = 1e-4
WIDTH, POOLED, TIME_DIM = 32, 32, 8  # text width; SDXL-like pooled width and size-embedding width


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def clip(activation: str, eos_token_id: int, projection: bool):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=activation, projection_dim=POOLED,
        eos_token_id=eos_token_id,
    )
    model = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)
    return randomize_(model, seed=3).eval()


def sd1_like_parts(tokenizer) -> dict:
    """Three levels (attention, attention, none) as SD 1.x; fixed head count; 1x1-conv projections."""
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = diffusers.PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, skip_prk_steps=True
    )
    return dict(unet=randomize_(unet, seed=1).eval(), vae=randomize_(vae, seed=2).eval(),
                text_encoder=clip("quick_gelu", 2, projection=False), tokenizer=tokenizer, scheduler=scheduler)


def sdxl_like_parts(tokenizer) -> dict:
    """SDXL's structure: no attention at level 0, deeper transformers below, a fixed head width,
    linear projections, two text encoders, the vector conditioning ("text_time")."""
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
        cross_attention_dim=2 * WIDTH, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        prediction_type="v_prediction", timestep_spacing="trailing",
    )
    parts = dict(unet=randomize_(unet, seed=4).eval(), vae=randomize_(vae, seed=5).eval(),
                 text_encoder=clip("quick_gelu", 2, projection=False),
                 text_encoder_2=clip("gelu", 49407, projection=True), tokenizer=tokenizer, tokenizer_2=tokenizer,
                 scheduler=scheduler)
    with torch.no_grad():  # values an fp16 file holds exactly, so the fp16 variant loses nothing
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            for p in parts[name].parameters():
                p.copy_(p.half().float())
    return parts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """CLIP's tokenizer with the official folders' ``model_max_length`` 77 (diffusers' pipelines
    pad and truncate prompts to it; without it they fail on an overflowing length)."""
    folder = write_tokenizer_folder(tmp_path_factory.mktemp("tok"))
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory, tokenizer):
    parts = sd1_like_parts(tokenizer)
    pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd1") / "pipe"
    pipe.save_pretrained(folder)
    return folder, parts


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, tokenizer):
    parts = sdxl_like_parts(tokenizer)
    pipe = diffusers.StableDiffusionXLPipeline(**parts)
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    pipe.to(torch.float32)
    return folder, parts


# ---------------------------------------------------------------- comparisons
@torch.no_grad()
def check_vae(ours: AutoencoderKL, theirs: diffusers.AutoencoderKL, size: int) -> None:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
    assert rel_err(posterior.mean, reference.mean) < RTOL and rel_err(posterior.std, reference.std) < RTOL
    z = reference.mean
    assert rel_err(ours.decode(z), theirs.decode(z).sample) < RTOL
    assert ours.config.scaling_factor == theirs.config.scaling_factor


@torch.no_grad()
def check_text(ours, theirs, projection: bool) -> None:
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 49406, 49407, 0
    ids[1, 29] = 49407
    out, ref = ours(ids), theirs(ids, output_hidden_states=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < RTOL
    assert all(rel_err(a, b) < RTOL for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    if projection:
        assert rel_err(out.text_embeds, ref.text_embeds) < RTOL
    else:
        assert rel_err(out.pooled, ref.pooler_output) < RTOL


def check_tokenizer(ours, theirs) -> None:
    for prompt in ("a photograph of an astronaut riding a horse", "Stable Diffusion, 8k (masterpiece:1.2)!"):
        assert ours.encode(prompt) == theirs(prompt, add_special_tokens=False).input_ids


def test_sd1_like_folder_matches_diffusers(sd1_folder):
    folder, parts = sd1_folder
    loaded = load_components(folder)
    assert loaded.family.name == "CUSTOM" and loaded.prediction == "eps"
    assert loaded.family.scheduler == SchedulerConfig("scaled_linear", 0.00085, 0.012, 1000, "leading", 1)
    assert loaded.unet.config.num_heads == 2 and not loaded.unet.config.use_linear_projection
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, WIDTH, generator=g)
    t = torch.tensor([17.0, 803.0])
    with torch.no_grad():
        expected = parts["unet"](x, t, encoder_hidden_states=ctx).sample
        assert rel_err(loaded.unet(x, t, ctx), expected) < RTOL
    check_vae(loaded.vae, parts["vae"], 16)
    check_text(loaded.text_encoder, parts["text_encoder"], projection=False)
    check_tokenizer(loaded.tokenizer, parts["tokenizer"])
    assert loaded.text_encoder_2 is None and loaded.tokenizer_2 is None


def test_sdxl_like_fp16_variant_folder_matches_diffusers(sdxl_folder):
    folder, parts = sdxl_folder
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = load_components(folder)  # only fp16 weights in the folder: loaded into float32
    assert loaded.unet.time_embed[0].weight.dtype == torch.float32
    assert loaded.prediction == "v" and loaded.family.scheduler.spacing == "trailing"
    cfg = loaded.unet.config
    assert (cfg.transformer_depth, cfg.transformer_depth_middle, cfg.num_head_channels) == ((0, 1, 2), 2, 16)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 2 * WIDTH, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 8, 0, 64, 64]])
    y = torch.cat([pooled, timestep_embedding(sizes.flatten(), TIME_DIM).reshape(2, -1)], dim=1)
    t = torch.tensor([17.0, 803.0])
    with torch.no_grad():
        cond = {"text_embeds": pooled, "time_ids": sizes}
        expected = parts["unet"](x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
        assert rel_err(loaded.unet(x, t, ctx, y=y), expected) < RTOL
    check_vae(loaded.vae, parts["vae"], 16)
    check_text(loaded.text_encoder, parts["text_encoder"], projection=False)
    check_text(loaded.text_encoder_2, parts["text_encoder_2"], projection=True)
    assert loaded.text_encoder_2.config.pooling == "eos_token" and loaded.text_encoder.config.pooling == "argmax"
    check_tokenizer(loaded.tokenizer_2, parts["tokenizer_2"])


def test_load_in_bf16_and_a_component_folder(sd1_folder):
    folder, parts = sd1_folder
    loaded = load_components(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.bfloat16}
    vae = load_components(folder / "vae")
    assert vae.vae is not None and vae.unet is None and vae.family.components == ("vae",)
    check_vae(vae.vae, parts["vae"], 16)


@pytest.mark.parametrize("missing", ["text_encoder", "tokenizer", "unet", "vae"])
def test_missing_sub_folder_is_named(sd1_folder, tmp_path, missing):
    copy = tmp_path / "pipe"
    shutil.copytree(sd1_folder[0], copy)
    shutil.rmtree(copy / missing)
    with pytest.raises(FileNotFoundError, match=f"without its {missing}/ sub-folder"):
        load_components(copy)


def test_missing_second_text_encoder(sdxl_folder, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(sdxl_folder[0], copy)
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="without its tokenizer_2/ sub-folder"):
        load_components(copy)
    shutil.rmtree(copy / "text_encoder_2")
    (copy / "model_index.json").unlink()
    with pytest.raises(ValueError, match="context of width 64, but the text encoders give 32"):
        load_components(copy)


def test_missing_weights_and_options_for_folders(sd1_folder, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(sd1_folder[0], copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*vae: expected one of diffusion_pytorch_model"):
        load_components(copy)
    with pytest.raises(ValueError, match="apply to single files"):
        load_components(copy, use_ema=True)


# ---------------------------------------------------------------- the real models' configs, on meta
REAL = {  # the published diffusers configs (the fields that differ from diffusers' defaults)
    "SD15": dict(cross_attention_dim=768),
    "SD15_INPAINT": dict(cross_attention_dim=768, in_channels=9),
    "SD2": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                upcast_attention=True),
    "SD2_INPAINT": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                        in_channels=9),
    "SDXL_BASE": dict(
        block_out_channels=[320, 640, 1280], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
    "SDXL_REFINER": dict(
        block_out_channels=[384, 768, 1536, 1536],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, cross_attention_dim=1280,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
    ),
}
PRESETS = {"SD15": SD15, "SD15_INPAINT": SD15_INPAINT, "SD2": SD2, "SD2_INPAINT": SD2_INPAINT,
           "SDXL_BASE": SDXL_BASE, "SDXL_REFINER": SDXL_REFINER}


def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("name", list(REAL))
def test_real_unet_configs_map_to_presets_and_convert_name_for_name(name):
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**REAL[name])
        ours = UNet(PRESETS[name])
    assert unet_config_from_diffusers(dict(theirs.config)) == PRESETS[name]
    assert shapes(convert_diffusers_unet(theirs.state_dict(), PRESETS[name])) == shapes(ours.state_dict())


def test_real_vae_config_maps_to_preset_and_converts_name_for_name():
    config = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**config)
        ours = AutoencoderKL(SD_VAE)
    assert vae_config_from_diffusers(dict(theirs.config)) == SD_VAE
    assert shapes(convert_diffusers_vae(theirs.state_dict(), SD_VAE)) == shapes(ours.state_dict())


def test_unsupported_diffusers_settings_are_named():
    with pytest.raises(ValueError, match="resnet_time_scale_shift='ada_group' is not supported"):
        unet_config_from_diffusers(dict(REAL["SD15"], block_out_channels=[320, 640, 1280, 1280],
                                        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                                        resnet_time_scale_shift="ada_group"))
    with pytest.raises(ValueError, match="time_cond_proj_dim=256 is not supported"):
        unet_config_from_diffusers({"time_cond_proj_dim": 256})


def test_unfog_load_takes_a_folder(sd1_folder):
    import unfog

    folder, _ = sd1_folder
    pipe = unfog.load(folder)
    assert pipe.family == "sd1" and {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    size = 4 * pipe.size_multiple
    latents = pipe("a cat", steps=2, width=size, height=size, output="latent")
    assert latents.shape == (1, 4, 4, 4)  # size_multiple is the VAE factor
    with pytest.raises(ValueError, match="family= and use_ema= apply to single files"):
        unfog.load(folder, family="SD15")
