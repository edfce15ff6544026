"""``models.dit.DiT`` against diffusers' ``DiTTransformer2DModel`` and ``ClassConditionalDiT``
against diffusers' ``DiTPipeline``, on the same random weights, fp32, within 1e-4 relative error
(max |a - b| / max |b|).

The weights are drawn in diffusers' model (every parameter, the zero-initialised ones included;
the timestep / class embedder that diffusers copies into every block is made one, as its
conversion of the official files does) and read into ours by ``checkpoint.dit``'s converter, so
the converter is under test too.

diffusers' DiT embeds timesteps with ``downscale_freq_shift=1`` (frequencies
``exp(-ln(10^4) i / 127)``), facebookresearch/DiT with 0 (``/ 128``), the embedding the released
weights were trained with and the one unfog uses. The parity tests set diffusers' shift to 0;
``test_diffusers_timestep_embedding_differs`` records the difference unpatched.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from unfog.checkpoint.dit import convert_diffusers_dit, dit_config, load_dit, save_dit
from unfog.models.dit import DiT, DiTConfig, sincos_positions
from unfog.pipelines.dit import ClassConditionalDiT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import randomize_, rel_err  # noqa: E402
from oracles import vae_to_diffusers  # noqa: E402

from unfog.models.vae import TINY_VAE, AutoencoderKL  # noqa: E402

RTOL = 1e-4
HEADS, HEAD_DIM, CLASSES = 2, 8, 1000  # DiTPipeline's null class is 1000


def diffusers_dit(*, sample_size=8, patch_size=2, layers=2, learn_sigma=True, shift=0, seed=0):
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                  out_channels=8 if learn_sigma else 4, num_layers=layers, sample_size=sample_size,
                                  patch_size=patch_size, num_embeds_ada_norm=CLASSES)
    randomize_(model, seed=seed)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(shared.state_dict())  # one embedder, as in the official model
        block.norm1.emb.time_proj.downscale_freq_shift = shift
    return model.eval()


def ours_from(model: DiTTransformer2DModel) -> DiT:
    weights = convert_diffusers_dit(model.state_dict())
    ours = DiT(dit_config(weights, num_heads=HEADS, input_size=model.config.sample_size))
    weights["pos_embed"] = ours.pos_embed
    ours.load_state_dict(weights, strict=True)
    return ours.eval()


def inputs(batch=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([999.0, 417.0, 3.0])[:batch]
    y = torch.tensor([0, 207, CLASSES])[:batch]  # the last: the null class
    return x, t, y


@pytest.mark.parametrize("patch_size, learn_sigma", [(2, True), (4, False), (1, True)])
@torch.no_grad()
def test_forward_matches_diffusers(patch_size, learn_sigma):
    theirs = diffusers_dit(patch_size=patch_size, learn_sigma=learn_sigma)
    ours = ours_from(theirs)
    x, t, y = inputs()
    expected = theirs(x, timestep=t, class_labels=y).sample
    assert ours(x, t, y=y).shape == expected.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert rel_err(ours(x, t, y=y), expected) <= RTOL


@torch.no_grad()
def test_diffusers_timestep_embedding_differs():
    """Unpatched, diffusers' DiT is not the reference model: its frequencies are i / 127."""
    theirs, patched = diffusers_dit(shift=1), diffusers_dit(shift=0)
    ours = ours_from(patched)
    x, t, y = inputs()
    assert rel_err(ours(x, t, y=y), patched(x, timestep=t, class_labels=y).sample) <= RTOL
    assert rel_err(ours(x, t, y=y), theirs(x, timestep=t, class_labels=y).sample) > 1e-3


def test_positions_match_diffusers_at_the_official_size():
    """DiT-XL/2 at 256 px: a 16 x 16 grid of width 1152 (MAE's table, which the file also stores)."""
    expected = torch.as_tensor(get_2d_sincos_pos_embed(1152, 16, output_type="pt")).float()
    assert rel_err(sincos_positions(1152, 16), expected) <= 1e-6


def test_official_layout_of_dit_xl_2():
    """Names and shapes of the released DiT-XL/2 files (from facebookresearch/DiT's model code:
    hidden 1152, 28 blocks, patch 2, 4 latent channels, learned sigma, 1000 classes + null)."""
    with torch.device("meta"):
        model = DiT(DiTConfig(input_size=32))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2), "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152), "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "final_layer.linear.weight": (32, 1152), "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152), "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    block = {"attn.qkv.weight": (3456, 1152), "attn.qkv.bias": (3456,), "attn.proj.weight": (1152, 1152),
             "attn.proj.bias": (1152,), "mlp.fc1.weight": (4608, 1152), "mlp.fc1.bias": (4608,),
             "mlp.fc2.weight": (1152, 4608), "mlp.fc2.bias": (1152,),
             "adaLN_modulation.1.weight": (6912, 1152), "adaLN_modulation.1.bias": (6912,)}
    expected.update({f"blocks.{i}.{k}": v for i in range(28) for k, v in block.items()})
    assert shapes == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 675_129_632  # the paper's 675M, pos_embed in


@torch.no_grad()
def test_files_round_trip(tmp_path):
    """An official-named .pt (as released: a plain state dict), a diffusers transformer folder, and
    unfog's own file load to the same model; a training checkpoint gives its EMA weights."""
    theirs = diffusers_dit(sample_size=8)
    ours = ours_from(theirs)
    x, t, y = inputs()
    expected = ours(x, t, y=y)
    torch.save(ours.state_dict(), tmp_path / "official.pt")
    torch.save({"model": DiT(ours.config).state_dict(), "ema": ours.state_dict()}, tmp_path / "train.pt")
    theirs.save_pretrained(tmp_path / "transformer")
    save_dit(ours, tmp_path / "ours.safetensors")
    for path in ("official.pt", "train.pt", "transformer", "ours.safetensors"):
        loaded = load_dit(tmp_path / path, num_heads=HEADS if path == "official.pt" or path == "train.pt" else None)
        assert loaded.config == ours.config, path
        assert torch.equal(loaded(x, t, y=y), expected), path


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0])
@torch.no_grad()
def test_pipeline_matches_diffusers_dit_pipeline(cfg_scale):
    theirs = diffusers_dit(sample_size=8)
    vae_ours = randomize_(AutoencoderKL(TINY_VAE), seed=3).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              set_alpha_to_one=True, clip_sample=False)
    pipe = DiTPipeline(transformer=theirs, vae=vae_to_diffusers(vae_ours), scheduler=scheduler)
    labels = [207, 3]
    expected = pipe(labels, guidance_scale=cfg_scale, num_inference_steps=6, output_type="pt",
                    generator=torch.Generator().manual_seed(5)).images  # (B, 3, H, W) in [0, 1]
    ours = ClassConditionalDiT(ours_from(theirs), vae_ours)
    images = ours(labels, steps=6, sampler="ddim", cfg_scale=cfg_scale, seed=5, output="tensor")
    assert rel_err((images + 1) / 2, expected) <= RTOL


def test_bad_inputs_are_named(tmp_path):
    cfg = DiTConfig(input_size=8, hidden_size=16, depth=1, num_heads=2, num_classes=10)
    model = DiT(cfg)
    with pytest.raises(ValueError, match=r"takes \(4, 8, 8\) latents"):
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1), y=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="class labels 0..9"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        replace(cfg, input_size=9)
    weights = {k: v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="width 16 is none of the official sizes.*pass num_heads="):
        dit_config(weights)
    torch.save({"unet.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DiT file"):
        load_dit(tmp_path / "other.pt")
    pipe = ClassConditionalDiT(model, AutoencoderKL(TINY_VAE))
    with pytest.raises(ValueError, match=r"class label 10 out of range; valid labels: 0..9"):
        pipe([10], steps=1)
    with pytest.raises(ValueError, match="no null class"):
        ClassConditionalDiT(DiT(replace(cfg, null_class=False)), AutoencoderKL(TINY_VAE))([1], steps=1)
