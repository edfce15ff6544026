"""Single-file checkpoints in the official layouts load tensor for tensor.

Every full layout (SD 1.x, SD 1.x inpainting, SD 2.x, SD 2.x inpainting, SDXL base, SDXL refiner)
is assembled from the fixture files (``shared/fixtures/checkpoint-layouts``) with the prefixes of
the real files, plus the non-weights they carry, and written as a safetensors file by our own
streaming writer. Each tensor carries a *mark* in its first two elements (its index in the file,
exact in fp16 and bf16), so after loading we check that every tensor of the U-Net, the VAE and
CLIP ViT-L arrived at its canonical place; the SD 1.x / 2.x files are random-valued throughout
and compared in full, the OpenCLIP towers (fused q/k/v, transposed projection) on spot checks.
The SDXL files (7 GB in fp16) are left zero except for marks and a few random tensors, written
sparse, and loaded in fp16, which maps the file instead of copying it.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from unfog.checkpoint.components import MODULES
from unfog.checkpoint.detect import FAMILIES, detect_family, get_family
from unfog.checkpoint.loader import IGNORED, load_components, split_components

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
from model_checks import LAYOUTS, read_layout  # noqa: E402

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_CLIP, SD2_CLIP = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
XL_CLIP_L, XL_BIGG, REFINER_BIGG = (
    "conditioner.embedders.0.transformer.text_model.",
    "conditioner.embedders.1.model.",
    "conditioner.embedders.0.model.",
)
# The layouts of each family's full file: (fixture, prefix).
FULL = {
    "SD15": [("UNET-v1-SD", UNET), ("VAE-v1-SD", VAE), ("CLIP-v1-SD", SD1_CLIP)],
    "SD15_INPAINT": [("UNET-v1-Inpainting", UNET), ("VAE-v1-SD", VAE), ("CLIP-v1-SD", SD1_CLIP)],
    "SD2": [("UNET-v2-SD", UNET), ("VAE-v1-SD", VAE), ("CLIP-v2-SD", SD2_CLIP)],
    "SD2_INPAINT": [("UNET-v2-Inpainting", UNET), ("VAE-v1-SD", VAE), ("CLIP-v2-SD", SD2_CLIP)],
    "SDXL_BASE": [("UNET-XL-SD", UNET), ("VAE-v1-SD", VAE), ("CLIP-v1-SD", XL_CLIP_L), ("CLIP-XL-SD", XL_BIGG)],
    "SDXL_REFINER": [("UNET-XL-Refiner", UNET), ("VAE-v1-SD", VAE), ("CLIP-XL-SD", REFINER_BIGG)],
}
# LDM's registered schedule buffers, which SD 1.x / 2.x files carry (float32, one per timestep).
SCHEDULE_BUFFERS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
POOL_OFFSETS = 1 << 20


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ---------------------------------------------------------------- writing fake checkpoints
class FakeCheckpoint:
    """The names, shapes and dtypes of a file, and the value each tensor gets.

    A tensor's first two elements are its mark ``(i // 200 + 1, i % 200 + 1)`` (exact in fp16 and
    bf16); the rest is a slice of one random pool (``random=True``, or for the names in ``spots``)
    or zero. ``expected(name)`` gives back the full value.
    """

    def __init__(self, parts, dtype, random: bool, spots=(), ema: bool = False, schedule: bool = True):
        self.dtype, self.random, self.spots = dtype, random, set(spots)
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for fixture, prefix in parts:
            for key, shape in read_layout(fixture).items():
                self.entries[prefix + key] = (shape, torch.int64 if key.endswith("position_ids") else dtype)
        if ema:  # LDM's EMA copy: "model_ema.diffusion_model" + the name without its dots
            for key, shape in read_layout("UNET-v1-EMA").items():
                self.entries["model_ema.diffusion_model" + key] = (shape, dtype)
            self.entries["model_ema.decay"] = ((), torch.float32)
            self.entries["model_ema.num_updates"] = ((), torch.int64)
        if schedule:
            self.entries |= {name: ((1000,), torch.float32) for name in SCHEDULE_BUFFERS}
            self.entries["logvar"] = ((1000,), torch.float32)
        self.index = {name: i for i, name in enumerate(self.entries)}
        filled = [s for name, (s, _) in self.entries.items() if random or name in self.spots]
        largest = max((math.prod(s) for s in filled), default=0)
        g = torch.Generator().manual_seed(0)
        self.pool = torch.randn(largest + POOL_OFFSETS, generator=g).to(dtype) if filled else None  # (N,)

    def mark(self, name: str) -> tuple[float, float]:
        i = self.index[name]
        return (i // 200 + 1.0, i % 200 + 1.0)

    def expected(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as written (float tensors; whole)."""
        shape, dtype = self.entries[name]
        n = math.prod(shape)
        if self.random or name in self.spots:
            start = zlib.crc32(name.encode()) % POOL_OFFSETS
            flat = self.pool[start : start + n].clone()
        else:
            flat = torch.zeros(n, dtype=dtype)
        flat[:2] = torch.tensor(self.mark(name)[: min(n, 2)])
        return flat.reshape(shape)

    def data(self, name: str) -> torch.Tensor:
        """What the writer puts at the start of the tensor's bytes (the rest stays zero)."""
        shape, dtype = self.entries[name]
        if dtype == torch.int64:
            return torch.arange(math.prod(shape))  # position_ids
        if self.random or name in self.spots:
            return self.expected(name)
        return torch.tensor(self.mark(name), dtype=dtype)[: math.prod(shape)]

    def write(self, path: Path, drop=(), reshape=None) -> Path:
        entries = {k: v for k, v in self.entries.items() if k not in drop}
        for name, shape in (reshape or {}).items():
            entries[name] = (shape, entries[name][1])
        write_safetensors(path, entries, lambda name: None if name in (reshape or {}) else self.data(name))
        return path


def write_safetensors(path: Path, entries: dict, data: Callable[[str], torch.Tensor | None]) -> None:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets),
    then each tensor's leading bytes from ``data`` at its offset; the rest is left as a hole in
    the file, which reads as zeros and takes no disk space."""
    order = sorted(entries, key=lambda k: (-entries[k][1].itemsize, k))  # keeps every offset aligned
    header, offset = {}, 0
    for name in order:
        shape, dtype = entries[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        start = f.tell()
        for name in order:
            value = data(name)
            if value is not None:
                f.seek(start + header[name]["data_offsets"][0])
                f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy())
        f.truncate(start + offset)


# ---------------------------------------------------------------- checking what arrived
def canonical(name: str, prefix: str) -> str:
    return name[len(prefix) :].removeprefix("text_model.")


def check_marks(ckpt: FakeCheckpoint, module: torch.nn.Module, prefix: str, full: bool) -> None:
    """Every tensor under ``prefix`` (a component in canonical naming) is where it belongs: its
    mark, and with ``full`` its whole value, arrived unchanged (up to the cast to the module dtype)."""
    params = module.state_dict()
    names = [n for n in ckpt.entries if n.startswith(prefix) and not n.endswith("position_ids")]
    assert len(names) == len(params)
    for name in names:
        p = params[canonical(name, prefix)]
        assert p.flatten()[:2].tolist() == list(ckpt.mark(name)), name
        if full or name in ckpt.spots:
            assert torch.equal(p, ckpt.expected(name).to(p.dtype)), name


def check_openclip(ckpt: FakeCheckpoint, encoder: torch.nn.Module, prefix: str, layer: int) -> None:
    """Spot checks of an OpenCLIP tower: embeddings, the q/k/v split of a fused in_proj, the MLP,
    the final norm, and the projection (transposed into a Linear weight)."""
    params = encoder.state_dict()

    def same(ours: str, theirs: torch.Tensor) -> None:
        assert torch.equal(params[ours], theirs.to(params[ours].dtype)), ours

    block, ours = f"{prefix}transformer.resblocks.{layer}.", f"encoder.layers.{layer}."
    same("embeddings.token_embedding.weight", ckpt.expected(prefix + "token_embedding.weight"))
    same("embeddings.position_embedding.weight", ckpt.expected(prefix + "positional_embedding"))
    for kind in ("weight", "bias"):
        for part, chunk in zip("qkv", ckpt.expected(block + f"attn.in_proj_{kind}").chunk(3)):
            same(ours + f"self_attn.{part}_proj.{kind}", chunk)
    same(ours + "mlp.fc1.weight", ckpt.expected(block + "mlp.c_fc.weight"))
    same("final_layer_norm.bias", ckpt.expected(prefix + "ln_final.bias"))
    same("text_projection.weight", ckpt.expected(prefix + "text_projection").t())


@pytest.fixture
def file_path(tmp_path):
    """A path whose file is deleted after the test (they are gigabytes)."""
    path = tmp_path / "model.safetensors"
    yield path
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------- every layout, names only
@pytest.mark.parametrize("family", list(FULL))
def test_every_tensor_of_each_full_layout_is_consumed(family):
    """On the meta device: detection, then each component's tensors are exactly the module's."""
    shapes = {}
    for fixture, prefix in FULL[family]:
        shapes |= {prefix + k: s for k, s in read_layout(fixture).items()}
    shapes |= {name: (1000,) for name in SCHEDULE_BUFFERS}
    detected = detect_family(shapes)
    assert detected.name == family
    parts = split_components({k: torch.empty(s, device="meta") for k, s in shapes.items()}, detected)
    for component, tensors in parts.items():
        with torch.device("meta"):
            module = MODULES[component](getattr(detected, component))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            k: tuple(v.shape) for k, v in module.state_dict().items()
        }, component


def test_bare_components_and_trimmed_text_encoder_are_detected():
    unet = detect_family(read_layout("UNET-XL-SD"))
    assert (unet.name, unet.components, unet.prefix("unet")) == ("SDXL_BASE", ("unet",), "")
    vae = detect_family(read_layout("VAE-v1-SD"))
    assert (vae.name, vae.components, vae.vae.scaling_factor) == ("VAE", ("vae",), 0.18215)
    # Waifu Diffusion 1.5: SD 2 with a 23-layer ViT-H and no text projection.
    shapes = {UNET + k: s for k, s in read_layout("UNET-v2-SD").items()}
    shapes |= {SD2_CLIP + k: s for k, s in read_layout("CLIP-v2-WD").items()}
    wd = detect_family(shapes)
    assert (wd.name, wd.components, wd.text_encoder.layers, wd.text_encoder.projection_dim) == (
        "SD2", ("unet", "text_encoder"), 23, None)


@pytest.mark.parametrize("fixture, hint", [("UNET-v1-Pix2Pix", "InstructPix2Pix"), ("UNET-v2-Depth", "depth")])
def test_unsupported_unets_are_named(fixture, hint):
    shapes = {UNET + k: s for k, s in read_layout(fixture).items()}
    with pytest.raises(ValueError, match=f"(?s)matches no supported family.*{hint}.*Supported: SD15"):
        detect_family(shapes)


def test_unknown_layout_describes_the_keys():
    shapes = {f"lora_te.layer{i}.alpha": () for i in range(3)} | {"foo.bar.weight": (2, 3)}
    with pytest.raises(ValueError) as err:
        detect_family(shapes)
    message = str(err.value)
    assert "not a Stable Diffusion checkpoint layout" in message
    assert "4 tensors" in message and "lora_te. (3)" in message and "foo. (1)" in message
    assert "foo.bar.weight [2, 3]" in message


def test_family_names_and_predictions():
    assert get_family("sd2").prediction == "v" and get_family("SD2_INPAINT").prediction == "eps"
    assert {f.prediction for n, f in FAMILIES.items() if n not in ("SD2", "VAE", "SDXL_VAE")} == {"eps"}
    with pytest.raises(ValueError, match="valid names: SD15, SD15_INPAINT"):
        get_family("SD3")


def test_ignored_names_cover_the_readme():
    readme = (LAYOUTS / "README.md").read_text()
    for pattern in ("alphas_cumprod", "betas", "logvar", "posterior_*", "sqrt_*alphas_cumprod", "model_ema.*"):
        assert pattern in IGNORED and f"`{pattern}`" in readme


# ---------------------------------------------------------------- real files, random values
@pytest.mark.parametrize(
    "family, file_dtype, dtype",
    [
        pytest.param("SD15", torch.float16, torch.float32, id="SD15-fp16-to-fp32"),
        pytest.param("SD15_INPAINT", torch.bfloat16, torch.float32, id="SD15_INPAINT-bf16-to-fp32"),
        pytest.param("SD2", torch.float16, torch.float16, id="SD2-fp16-to-fp16"),
        pytest.param("SD2_INPAINT", torch.float16, torch.bfloat16, id="SD2_INPAINT-fp16-to-bf16"),
    ],
)
@pytest.mark.slow
def test_full_sd_checkpoint_loads_every_value(family, file_dtype, dtype, file_path):
    ckpt = FakeCheckpoint(FULL[family], file_dtype, random=True)
    ckpt.write(file_path)
    loaded = load_components(file_path, dtype=dtype)
    assert loaded.family.name == family and loaded.family.components == ("unet", "vae", "text_encoder")
    for component in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert {p.dtype for p in component.state_dict().values()} == {dtype}
    check_marks(ckpt, loaded.unet, UNET, full=True)
    check_marks(ckpt, loaded.vae, VAE, full=True)
    if family.startswith("SD15"):
        check_marks(ckpt, loaded.text_encoder, SD1_CLIP, full=True)
    else:
        check_openclip(ckpt, loaded.text_encoder, SD2_CLIP, layer=23)
    assert loaded.tokenizer is not None and loaded.tokenizer_2 is None


SDXL_SPOTS = {  # the tensors given random values in the (otherwise zero) SDXL files
    "SDXL_BASE": [
        UNET + "label_emb.0.0.weight",
        UNET + "middle_block.1.transformer_blocks.9.attn2.to_k.weight",
        UNET + "output_blocks.2.1.transformer_blocks.9.ff.net.0.proj.weight",
        VAE + "decoder.up.0.block.2.conv2.weight",
        XL_CLIP_L + "encoder.layers.11.mlp.fc2.weight",
        *(XL_BIGG + k for k in ("token_embedding.weight", "positional_embedding", "text_projection",
                                "transformer.resblocks.31.attn.in_proj_weight", "transformer.resblocks.31.attn.in_proj_bias",
                                "transformer.resblocks.31.mlp.c_fc.weight", "ln_final.bias")),
    ],
    "SDXL_REFINER": [
        UNET + "label_emb.0.0.weight",
        UNET + "input_blocks.7.1.transformer_blocks.3.attn2.to_v.weight",
        *(REFINER_BIGG + k for k in ("token_embedding.weight", "positional_embedding", "text_projection",
                                     "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_bias",
                                     "transformer.resblocks.0.mlp.c_fc.weight", "ln_final.bias")),
    ],
}


@pytest.mark.parametrize("family", ["SDXL_BASE", "SDXL_REFINER"])
def test_full_sdxl_checkpoint_loads(family, file_path):
    ckpt = FakeCheckpoint(FULL[family], torch.float16, random=False, spots=SDXL_SPOTS[family], schedule=False)
    ckpt.write(file_path)
    loaded = load_components(file_path, dtype=torch.float16)
    assert loaded.family.name == family
    assert loaded.vae.config.scaling_factor == 0.13025
    check_marks(ckpt, loaded.unet, UNET, full=False)
    check_marks(ckpt, loaded.vae, VAE, full=False)
    if family == "SDXL_BASE":
        assert loaded.family.components == ("unet", "vae", "text_encoder", "text_encoder_2")
        check_marks(ckpt, loaded.text_encoder, XL_CLIP_L, full=False)
        check_openclip(ckpt, loaded.text_encoder_2, XL_BIGG, layer=31)
    else:
        assert loaded.family.components == ("unet", "vae", "text_encoder_2") and loaded.text_encoder is None
        check_openclip(ckpt, loaded.text_encoder_2, REFINER_BIGG, layer=0)


# ---------------------------------------------------------------- options and errors (sparse SD 1.x files)
@pytest.fixture(scope="module")
def sd15():
    return FakeCheckpoint(FULL["SD15"], torch.float16, random=False, ema=True)


def test_ema_weights_on_request(sd15, file_path):
    sd15.write(file_path)
    plain = load_components(file_path, dtype=torch.float16)
    check_marks(sd15, plain.unet, UNET, full=False)
    ema = load_components(file_path, dtype=torch.float16, use_ema=True).unet.state_dict()
    for key in read_layout("UNET-v1-SD"):
        flat = "model_ema.diffusion_model" + key.replace(".", "")
        assert ema[key].flatten()[:2].tolist() == list(sd15.mark(flat)), key


def test_ema_request_without_ema_weights(file_path):
    FakeCheckpoint(FULL["SD15"], torch.float16, random=False).write(file_path)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_components(file_path, use_ema=True)


def test_missing_tensor_is_named(sd15, file_path):
    sd15.write(file_path, drop={UNET + "out.2.bias", UNET + "input_blocks.1.0.in_layers.0.bias"})
    with pytest.raises(ValueError) as err:
        load_components(file_path, dtype=torch.float16)
    message = str(err.value)
    assert "the unet weights of SD15 (under 'model.diffusion_model.')" in message
    assert "2 missing: input_blocks.1.0.in_layers.0.bias, out.2.bias" in message


def test_wrong_shape_is_named(sd15, file_path):
    sd15.write(file_path, reshape={VAE + "decoder.conv_out.weight": (3, 128, 1, 1)})
    with pytest.raises(ValueError, match=r"1 with the wrong shape: decoder\.conv_out\.weight: expected \(3, 128, 3, 3\), "
                                         r"found \(3, 128, 1, 1\)"):
        load_components(file_path, dtype=torch.float16)


def test_unknown_tensor_is_named(sd15, file_path):
    ckpt = FakeCheckpoint(FULL["SD15"], torch.float16, random=False)
    ckpt.entries |= {"control_model.zero_convs.0.0.weight": ((320, 320, 1, 1), torch.float16)}
    ckpt.index = {name: i for i, name in enumerate(ckpt.entries)}
    ckpt.write(file_path)
    with pytest.raises(ValueError, match="1 tensors belong to no component of SD15.*control_model.zero_convs.0.0.weight"):
        load_components(file_path, dtype=torch.float16)


def test_truncated_file(sd15, file_path):
    sd15.write(file_path)
    with open(file_path, "r+b") as f:
        f.truncate(file_path.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_components(file_path)


def test_prediction_override_and_bare_vae_family(file_path):
    FakeCheckpoint([("VAE-v1-SD", "")], torch.bfloat16, random=True, schedule=False).write(file_path)
    vae = load_components(file_path)
    assert vae.family.name == "VAE" and vae.unet is None and vae.prediction is None
    assert vae.vae.config.scaling_factor == 0.18215 and vae.vae.quant_conv.weight.dtype == torch.float32
    xl = load_components(file_path, family="SDXL_VAE")
    assert xl.vae.config.scaling_factor == 0.13025
    with pytest.raises(ValueError, match="valid choices: eps, v, x0"):
        load_components(file_path, prediction="epsilon")


def test_sd2_prediction_default_and_override(file_path):
    FakeCheckpoint([("UNET-v2-SD", UNET)], torch.float16, random=False).write(file_path)
    assert load_components(file_path, dtype=torch.float16).prediction == "v"
    base = load_components(file_path, dtype=torch.float16, prediction="eps")
    assert base.prediction == "eps" and base.family.name == "SD2" and base.vae is None


def test_pickle_ckpt_with_prefixed_vae(tmp_path):
    """A ``torch.save`` checkpoint (read without running pickle code) holding a VAE under its
    full-checkpoint prefix, with LDM's nesting under "state_dict" and a global_step."""
    ckpt = FakeCheckpoint([("VAE-v1-SD", VAE)], torch.float16, random=True)
    tensors = {name: ckpt.expected(name) for name, (_, dtype) in ckpt.entries.items() if dtype == torch.float16}
    tensors |= {name: torch.zeros(shape) for name, (shape, dtype) in ckpt.entries.items() if dtype == torch.float32}
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": tensors, "global_step": 875000}, path)
    loaded = load_components(path)
    path.unlink()
    assert loaded.family.name == "VAE" and loaded.family.prefix("vae") == VAE
    check_marks(ckpt, loaded.vae, VAE, full=True)
