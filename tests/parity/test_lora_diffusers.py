"""LoRA files merged by unfog against diffusers' own LoRA loaders on the same weights.

Each case writes a LoRA file with random values (alpha != rank, so the alpha / rank scale is
exercised), merges it into our models with ``LoraStack`` and loads the same file into diffusers'
twins with ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` (PEFT
layers) and ``fuse_lora``; the outputs must agree within 1e-4 relative in float32:

- kohya SD 1.5: the exact names and shapes of the fixture ``LoRA-v1A-{UNET,CLIP}.txt`` (diffusers'
  U-Net names, the 1x1-conv ``proj_in`` / ``proj_out``), on the full-size SD 1.5 U-Net and a
  12-layer CLIP ViT-L text encoder;
- kohya SDXL: LDM names (``lora_unet_input_blocks_4_1_…``) and both text encoders
  (``lora_te1_`` / ``lora_te2_``), on a narrow U-Net with SDXL's block structure and context width;
- PEFT / diffusers (``unet.down_blocks.….lora_A.weight``), on the same narrow U-Net.

A LoRA moves the U-Net output by 1e-2 to 1e-1 relative here, so a missed or misplaced module
fails by orders of magnitude more than the tolerance.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: oracles
from model_checks import randomize_, rel_err  # noqa: E402
from oracles import diffusers_twin, load_into_diffusers  # noqa: E402
from test_unet_presets_diffusers import random_unet  # noqa: E402

from unfog.checkpoint.convert import convert_transformers_clip_text  # noqa: E402
from unfog.checkpoint.lora import kohya_metadata, save_lora  # noqa: E402
from unfog.models.clip_text import CLIPTextConfig, CLIPTextEncoder  # noqa: E402
from unfog.models.presets import SD15, SDXL_BASE  # noqa: E402
from unfog.models.unet import UNet  # noqa: E402
from unfog.nn.embeddings import timestep_embedding  # noqa: E402
from unfog.nn.lora import AdapterWeights  # noqa: E402
from unfog.pipelines.lora import LoraStack, short_hash  # noqa: E402
from unfog.pipelines.lora_extract import extraction_targets  # noqa: E402

RTOL = 1e-4
RANK, ALPHA = 4, 2.5
LAYOUTS = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "checkpoint-layouts"
# A narrow U-Net with SDXL's blocks (3 levels, no attention at the first, linear projections)
# and its context width: every LDM name an SDXL LoRA uses, at a tenth of the cost.
NARROW_XL = replace(SDXL_BASE, model_channels=64, transformer_depth=(0, 2, 2), transformer_depth_middle=2)


def fixture_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a layout file, the LoRA rank (-1) replaced by RANK."""
    out = {}
    for line in (LAYOUTS / name).read_text().splitlines():
        key, shape = line.split(" ", 1)
        out[key] = tuple(RANK if int(d) == -1 else int(d) for d in shape.strip("[]").split(",") if d)
    return out


def random_lora(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA tensors: down ~ N(0, 1/fan_in), up ~ N(0, 0.05^2), every alpha ALPHA."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(ALPHA)
        elif ".lora_down." in key or ".lora_A." in key:
            out[key] = torch.randn(shape, generator=g) / (torch.tensor(shape[1:]).prod().sqrt())
        else:
            out[key] = 0.05 * torch.randn(shape, generator=g)
    return out


def linear_lora_shapes(names: dict[str, tuple[int, int]], down: str, up: str, alpha: bool) -> dict[str, tuple]:
    """Shapes of a rank-RANK LoRA on Linear modules {key: (out, in)}."""
    shapes = {}
    for key, (n_out, n_in) in names.items():
        shapes[f"{key}{down}"] = (RANK, n_in)
        shapes[f"{key}{up}"] = (n_out, RANK)
        if alpha:
            shapes[f"{key}.alpha"] = ()
    return shapes


def clip_pair(width: int, heads: int, layers: int, activation: str, projection: int | None, seed: int):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=activation,
        projection_dim=projection or 512, bos_token_id=49406, eos_token_id=2, attn_implementation="eager")
    cls = transformers.CLIPTextModel if projection is None else transformers.CLIPTextModelWithProjection
    ref = randomize_(cls(config), seed=seed).eval()
    ours = CLIPTextEncoder(CLIPTextConfig(width=width, layers=layers, heads=heads,
                                          activation=activation, projection_dim=projection)).eval()
    ours.load_state_dict(convert_transformers_clip_text(ref.state_dict()), strict=True)
    return ref, ours


def unet_inputs(cfg, seed: int = 1) -> tuple[dict, dict]:
    """Keyword arguments for our U-Net and for diffusers' (SDXL: y = pooled text + size embeddings)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 77, cfg.context_dim, generator=g)
    t = torch.tensor([417.0])
    ours, theirs = dict(x=x, timesteps=t, context=context), dict(sample=x, timestep=t, encoder_hidden_states=context)
    if cfg.num_classes == "sequential":
        pooled, time_ids = torch.randn(1, 1280, generator=g), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
        ours["y"] = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(1, -1)], dim=1)
        theirs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return ours, theirs


def text_output(model, ids):
    out = model(ids, output_hidden_states=True) if isinstance(model, transformers.PreTrainedModel) else model(ids)
    return out.last_hidden_state


IDS = torch.tensor([[0, 17, 255, 3, 999, 42, 2] + [2] * 70])


def test_kohya_sd15_lora_matches_diffusers(tmp_path):
    """The fixture's SD 1.5 names on the full-size U-Net and a 12-layer ViT-L text encoder."""
    shapes = fixture_shapes("LoRA-v1A-UNET.txt") | fixture_shapes("LoRA-v1A-CLIP.txt")
    path = tmp_path / "sd15_lora.safetensors"
    save_file(random_lora(shapes, seed=3), str(path))

    ours_unet = random_unet("SD15")
    twin = diffusers_twin(ours_unet.config)
    load_into_diffusers(ours_unet, twin)
    ref_te, ours_te = clip_pair(768, 12, 12, "quick_gelu", None, seed=4)
    our_args, their_args = unet_inputs(ours_unet.config)
    with torch.no_grad():
        before = ours_unet(**our_args)

    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
        {k: v.clone() for k, v in random_lora(shapes, seed=3).items()})
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, twin, adapter_name="a")
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state_dict, alphas, ref_te, adapter_name="a")
    twin.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        expected = twin(**their_args).sample
        expected_te = text_output(ref_te, IDS)
    del twin

    stack = LoraStack({"unet": ours_unet, "text_encoder": ours_te})
    applied = stack.add(path)
    assert applied.unmatched == ()
    with torch.no_grad():
        got = ours_unet(**our_args)
        got_te = ours_te(IDS).last_hidden_state
    assert rel_err(got, expected) <= RTOL
    assert rel_err(got, before) > 100 * RTOL  # the LoRA did change the output
    assert rel_err(got_te, expected_te) <= RTOL


def sdxl_models():
    torch.manual_seed(0)
    ours_unet = randomize_(UNet(NARROW_XL), seed=5).eval()
    twin = diffusers_twin(NARROW_XL, addition_embed_type="text_time", addition_time_embed_dim=256,
                          projection_class_embeddings_input_dim=NARROW_XL.adm_in_channels)
    load_into_diffusers(ours_unet, twin)
    return ours_unet, twin


def diffusers_sdxl_outputs(tensors: dict, twin, text_encoders, their_args):
    """diffusers' SDXL loader on a kohya state dict: the fused U-Net's and both text encoders' outputs."""
    mixin = StableDiffusionXLLoraLoaderMixin
    state_dict, alphas = mixin.lora_state_dict({k: v.clone() for k, v in tensors.items()}, unet_config=twin.config)
    mixin.load_lora_into_unet(state_dict, alphas, twin, adapter_name="a")
    for ref, prefix in zip(text_encoders, ("text_encoder", "text_encoder_2")):
        mixin.load_lora_into_text_encoder(state_dict, alphas, ref, prefix=prefix, adapter_name="a")
    twin.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        return twin(**their_args).sample, [text_output(ref, IDS) for ref in text_encoders]


def assert_sdxl_merge_matches(models: dict, path, our_args: dict, expected, expected_te) -> None:
    """Merge the file at ``path`` into our U-Net and both text encoders; every module matched, and
    the outputs equal diffusers' within RTOL."""
    assert LoraStack(models).add(path).unmatched == ()
    with torch.no_grad():
        got = models["unet"](**our_args)
        got_te = [models[name](IDS).last_hidden_state for name in ("text_encoder", "text_encoder_2")]
    assert rel_err(got, expected) <= RTOL
    for g, e in zip(got_te, expected_te):
        assert rel_err(g, e) <= RTOL


def test_kohya_sdxl_lora_with_ldm_names_and_two_text_encoders_matches_diffusers(tmp_path):
    ours_unet, twin = sdxl_models()
    ref_te1, ours_te1 = clip_pair(768, 12, 3, "quick_gelu", None, seed=6)
    ref_te2, ours_te2 = clip_pair(1280, 20, 3, "gelu", 1280, seed=7)
    targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    linears = {}
    for path, module in ours_unet.named_modules():  # LDM names, as kohya's SDXL trainer writes them
        if isinstance(module, torch.nn.Linear) and (path.endswith(targets) or path.endswith(("proj_in", "proj_out"))):
            linears["lora_unet_" + path.replace(".", "_")] = tuple(module.weight.shape)
    for prefix, ref in (("lora_te1_", ref_te1), ("lora_te2_", ref_te2)):
        text = getattr(ref, "text_model", ref)
        for i in range(3):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                w = text.encoder.layers[i].self_attn.get_submodule(proj).weight
                linears[f"{prefix}text_model_encoder_layers_{i}_self_attn_{proj}"] = tuple(w.shape)
            for fc in ("fc1", "fc2"):
                w = text.encoder.layers[i].mlp.get_submodule(fc).weight
                linears[f"{prefix}text_model_encoder_layers_{i}_mlp_{fc}"] = tuple(w.shape)
    tensors = random_lora(linear_lora_shapes(linears, ".lora_down.weight", ".lora_up.weight", True), seed=8)
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(tensors, str(path))

    our_args, their_args = unet_inputs(NARROW_XL)
    expected, expected_te = diffusers_sdxl_outputs(tensors, twin, (ref_te1, ref_te2), their_args)

    models = {"unet": ours_unet, "text_encoder": ours_te1, "text_encoder_2": ours_te2}
    assert_sdxl_merge_matches(models, path, our_args, expected, expected_te)


def test_peft_format_lora_matches_diffusers(tmp_path):
    """diffusers / PEFT keys ``unet.<diffusers module>.lora_A.weight``, no alphas (alpha = rank)."""
    ours_unet, twin = sdxl_models()
    linears = {f"unet.{name}": tuple(m.weight.shape) for name, m in twin.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    tensors = random_lora(linear_lora_shapes(linears, ".lora_A.weight", ".lora_B.weight", False), seed=9)
    path = tmp_path / "peft_lora.safetensors"
    save_file(tensors, str(path))

    our_args, their_args = unet_inputs(NARROW_XL)
    mixin = StableDiffusionXLLoraLoaderMixin
    state_dict, alphas = mixin.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    mixin.load_lora_into_unet(state_dict, alphas, twin, adapter_name="a")
    twin.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        expected = twin(**their_args).sample

    stack = LoraStack({"unet": ours_unet})
    assert stack.add(path).unmatched == ()
    with torch.no_grad():
        got = ours_unet(**our_args)
    assert rel_err(got, expected) <= RTOL


# ---------------------------------------------------------------- files written by save_lora


def random_adapters(models: dict, seed: int) -> dict:
    """A rank-RANK LoRA (alpha ALPHA) with random values on every module kohya targets, the ResBlock
    and sampler convs included (3x3 LoCon: down (r, in, 3, 3), up (out, r, 1, 1))."""
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for target, rank in extraction_targets(models, RANK, conv_rank=RANK):
        w = target.module.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = 0.05 * torch.randn(w.shape[0], rank, *((1, 1) if w.dim() == 4 else ()), generator=g)
        adapters[target] = AdapterWeights("lora", {"lora_down": down, "lora_up": up}, ALPHA)
    return adapters


def check_written_metadata(path: Path, given: dict[str, str]) -> None:
    """The header holds ``given`` as plain strings, and kohya's two hashes computed here by their
    definition (sd-scripts ``train_util.precalculate_safetensors_hashes``): the sha256 of the tensor
    data after the header, in full (A1111's short hash is its first 12 digits), and the legacy one
    over bytes [1 MiB, 1 MiB + 64 KiB) of the file serialized with the ``ss_*`` metadata alone."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert {k: raw[k] for k in given} == given and all(type(v) is str for v in raw.values())
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert raw["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert short_hash(path) == raw["sshs_model_hash"][:12]
    ss_only = safetensors_save(load_file(str(path)), {k: v for k, v in given.items() if k.startswith("ss_")})
    assert len(ss_only) > 0x110000  # the legacy hash covers real bytes
    assert raw["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


SD15_NARROW = replace(SD15, model_channels=64)  # SD 1.5's blocks, 1x1-conv proj_in / proj_out, context 768


@pytest.mark.slow  # about 50 s on 2 busy cores, like the other cases here
def test_save_lora_sd1_names_load_with_diffusers(tmp_path):
    """A file written by ``save_lora`` for SD 1.x (diffusers module names, ``lora_te_``), every
    kohya target including the ResBlock and sampler convs, through diffusers' kohya loader."""
    torch.manual_seed(0)
    ours_unet = randomize_(UNet(SD15_NARROW), seed=10).eval()
    twin = diffusers_twin(SD15_NARROW)
    load_into_diffusers(ours_unet, twin)
    ref_te, ours_te = clip_pair(768, 12, 3, "quick_gelu", None, seed=11)
    models = {"unet": ours_unet, "text_encoder": ours_te}
    meta = kohya_metadata("sd1", rank=RANK, alpha=ALPHA, output_name="narrow_sd1", started_at=1.7e9,
                          conv_rank=RANK, extra={"ss_tag_frequency": '{"1_cat": {"cat": 3}}'})
    path = tmp_path / "narrow_sd1.safetensors"
    save_lora(path, random_adapters(models, seed=12), "sd1", meta, unet_config=SD15_NARROW)
    assert any("_resnets_" in k for k in load_file(str(path)))  # the convs are there
    check_written_metadata(path, meta)

    our_args, their_args = unet_inputs(SD15_NARROW)
    mixin = StableDiffusionLoraLoaderMixin
    state_dict, alphas = mixin.lora_state_dict(load_file(str(path)))
    mixin.load_lora_into_unet(state_dict, alphas, twin, adapter_name="a")
    mixin.load_lora_into_text_encoder(state_dict, alphas, ref_te, adapter_name="a")
    twin.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        before = ours_unet(**our_args)
        expected, expected_te = twin(**their_args).sample, text_output(ref_te, IDS)

    assert LoraStack(models).add(path).unmatched == ()
    with torch.no_grad():
        got, got_te = ours_unet(**our_args), ours_te(IDS).last_hidden_state
    assert rel_err(got, expected) <= RTOL
    assert rel_err(got, before) > 100 * RTOL
    assert rel_err(got_te, expected_te) <= RTOL


@pytest.mark.slow  # about 70 s on 2 busy cores
def test_save_lora_sdxl_names_load_with_diffusers(tmp_path):
    """A file written by ``save_lora`` for SDXL (LDM module names, ``lora_te1_`` / ``lora_te2_``)."""
    ours_unet, twin = sdxl_models()
    ref_te1, ours_te1 = clip_pair(768, 12, 3, "quick_gelu", None, seed=13)
    ref_te2, ours_te2 = clip_pair(1280, 20, 3, "gelu", 1280, seed=14)
    models = {"unet": ours_unet, "text_encoder": ours_te1, "text_encoder_2": ours_te2}
    meta = kohya_metadata("sdxl", rank=RANK, alpha=ALPHA, output_name="narrow_xl", started_at=1.7e9)
    path = tmp_path / "narrow_xl.safetensors"
    save_lora(path, random_adapters(models, seed=15), "sdxl", meta)
    keys = load_file(str(path))
    assert "lora_unet_input_blocks_4_1_proj_in.lora_down.weight" in keys
    assert any(k.startswith("lora_te2_text_model_encoder_layers_2_") for k in keys)
    check_written_metadata(path, meta)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    our_args, their_args = unet_inputs(NARROW_XL)
    expected, expected_te = diffusers_sdxl_outputs(keys, twin, (ref_te1, ref_te2), their_args)

    assert_sdxl_merge_matches(models, path, our_args, expected, expected_te)
