"""A whole SD 1.5 txt2img: unfog's ``StableDiffusion`` against diffusers' ``StableDiffusionPipeline``.

One image at 512 x 512, 20 steps of DPM++ 2M with Karras sigmas, classifier-free guidance 7.5, a
prompt and a negative prompt: text encoding, the 20 CFG steps and the VAE decode, as each
pipeline runs them (unfog on the CPU lays its U-Net and VAE out channels-last; diffusers keeps
the contiguous layout). ``--model sdxl``: SDXL base at 1024 x 1024, 30 steps, its two text
encoders (CLIP ViT-L and OpenCLIP ViT-bigG, random too) against ``StableDiffusionXLPipeline``.

The weights: random, in the official layout, the same on both sides. Every tensor of unfog's U-Net
(SD 1.5), VAE and CLIP ViT-L/14 text encoder (SDXL: and ViT-bigG) is drawn from its own seeded generator (matrices
N(0, 1/fan_in), norm scales 1 + 0.1 N(0, 1), biases 0.1 N(0, 1)); diffusers' models are given the
very same tensors through diffusers' own ``convert_ldm_unet_checkpoint`` and
``convert_ldm_vae_checkpoint`` and, for transformers' ``CLIPTextModel``, by the names alone (the
converters only rename, so both sides start from one copy of the weights; unfog's channels-last
layout then gives its convolutions a copy of their own). The tokenizers: unfog's own and
transformers' ``CLIPTokenizer`` on a vocabulary written from OpenAI's BPE file
(``tests/model_checks.write_tokenizer_folder``). Nothing is downloaded.

Both sides start from the same latents (``latents=``) and get the same prompts and the same
scheduler (SD's scaled_linear betas, leading spacing, steps offset 1, Karras sigmas); the script
prints the relative difference of the two images (max |a - b| / max |b|), which is the two
implementations' agreement, not a tolerance: diffusers' DPM-Solver++ and unfog's differ in their
last step (docs/samplers.md).

Time: the two sides alternate in ONE process (unfog, diffusers, diffusers, unfog, ...) after one
short warm-up call each (2 steps), so drift of the machine falls on both alike; the figure is the
median of ``--runs`` images per side. Memory: before each timed image the process's peak resident
set (VmHWM) is reset (``/proc/self/clear_refs``); "working MB" is the peak during the image less
the resident set just before it: the activations, workspace and copies the image needs on top of
the weights already in memory. "weights MB" is the three models' parameters in the dtype.

On a GPU (``--device cuda``) each image is timed between two ``torch.cuda.synchronize()`` and
"working MB" is the peak of PyTorch's CUDA allocator during the image less what it held before.
``--compile`` compiles both sides alike: unfog's ``pipe.compile("strict")`` and, on diffusers'
side, ``torch.compile`` of its U-Net and VAE decoder with the same mode (CUDA graphs on CUDA);
the warm-up then also compiles. ``--fuse-qkv``: unfog's ``pipe.fuse_qkv()`` and diffusers'
``fuse_qkv_projections()``. ``--batch N``: N images per prompt in one call (throughput in images/s).

    python benchmarks/txt2img.py                          # fp32 and bf16, 2 images per side each
    python benchmarks/txt2img.py --dtypes bf16 --runs 3
    python benchmarks/txt2img.py --quick                  # tiny models, seconds: checks the script
    python benchmarks/txt2img.py --device cuda --dtypes fp16 --runs 5 --compile --batch 8
    python benchmarks/txt2img.py --model sdxl --device cuda --dtypes fp16 --runs 3
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parity"))  # oracles: the diffusers configs of our models
sys.path.insert(0, str(ROOT / "tests"))  # model_checks: the tokenizer folder

from machine import cpu_flags  # noqa: E402
from unfog.models.clip_text import CLIP_L, OPENCLIP_BIGG, TINY_CLIP, CLIPTextConfig, CLIPTextEncoder  # noqa: E402
from unfog.models.presets import SD15, SDXL_BASE, TINY  # noqa: E402
from unfog.models.tokenizer import CLIPTokenizer  # noqa: E402
from unfog.models.unet import UNet, UNetConfig  # noqa: E402
from unfog.models.vae import SD_VAE, SDXL_VAE, TINY_VAE, AutoencoderKL, VAEConfig  # noqa: E402
from unfog.pipelines import StableDiffusion  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"
NEGATIVE = "blurry, low quality, watermark"
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    timestep_spacing="leading", steps_offset=1)
SIDES = ("unfog", "diffusers")


@dataclass(frozen=True)
class Setup:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    size: int
    steps: int
    text_2: CLIPTextConfig | None = None  # SDXL: OpenCLIP ViT-bigG, with its projection (pooled embedding)

    @property
    def family(self) -> str:
        return "sd1" if self.text_2 is None else "sdxl"

    @property
    def latent_side(self) -> int:
        return self.size // 2 ** (len(self.vae.channel_mult) - 1)  # the VAE's factor: 8, or 2 for --quick's


_TINY_G = replace(TINY_CLIP, width=48, activation="gelu", projection_dim=48)
SETUPS = {
    "sd15": Setup(SD15, SD_VAE, CLIP_L, 512, 20),
    "sdxl": Setup(SDXL_BASE, SDXL_VAE, CLIP_L, 1024, 30, OPENCLIP_BIGG),
}
QUICK_SETUPS = {  # --quick: the same pipelines on tiny models
    "sd15": Setup(replace(TINY, context_dim=TINY_CLIP.width), replace(TINY_VAE, scaling_factor=0.18215), TINY_CLIP,
                  64, 4),
    "sdxl": Setup(replace(TINY, context_dim=TINY_CLIP.width + _TINY_G.width, use_linear_projection=True,
                          num_classes="sequential", adm_in_channels=_TINY_G.width + 6 * 256),
                  replace(TINY_VAE, scaling_factor=0.13025), TINY_CLIP, 64, 4, _TINY_G),
}
FULL, QUICK = SETUPS["sd15"], QUICK_SETUPS["sd15"]


def random_weights(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """``module``'s state dict (built on the meta device) with seeded random values, one generator
    per tensor, so that no float32 copy of a bf16 model is ever made."""
    weights = {}
    for i, (name, value) in enumerate(module.state_dict().items()):
        noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed + i))
        if value.dim() > 1:
            noise = noise / math.sqrt(math.prod(value.shape[1:]))
        else:
            noise = 0.1 * noise + (1.0 if name.endswith("weight") else 0.0)
        weights[name] = noise.to(dtype)
    return weights


def build_unfog(setup: Setup, dtype: torch.dtype, device: str = "cpu") -> tuple[StableDiffusion, dict[str, dict]]:
    states = {}
    with torch.device("meta"):
        modules = {"unet": UNet(setup.unet), "vae": AutoencoderKL(setup.vae), "text": CLIPTextEncoder(setup.text)}
        if setup.text_2 is not None:
            modules["text_2"] = CLIPTextEncoder(setup.text_2)
    for seed, (name, module) in enumerate(modules.items()):
        states[name] = random_weights(module, dtype, seed * 100_000)
        module.load_state_dict(states[name], strict=True, assign=True)
    pipe = StableDiffusion(modules["unet"].eval(), modules["vae"].eval(), CLIPTokenizer.from_bpe_file(), setup.family,
                           text_encoder=modules["text"].eval(),
                           text_encoder_2=modules["text_2"].eval() if "text_2" in modules else None)
    return pipe.to(device), states  # .to: the device's memory layout, as unfog.load gives it


def text_model(config: CLIPTextConfig, state: dict[str, torch.Tensor]):
    """transformers' CLIPTextModel (CLIPTextModelWithProjection with a projection) holding ``state``,
    unfog's weights, by their names alone."""
    import transformers

    cls = transformers.CLIPTextModel if config.projection_dim is None else transformers.CLIPTextModelWithProjection
    with torch.device("meta"):
        text = cls(transformers.CLIPTextConfig(
            vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.width * 4,
            num_hidden_layers=config.layers, num_attention_heads=config.heads,
            max_position_embeddings=config.max_positions, hidden_act=config.activation,
            projection_dim=config.projection_dim or 512,
            bos_token_id=49406, eos_token_id=2))  # eos 2: the argmax pooling of the official configs
    prefix = "text_model." if any(k.startswith("text_model.") for k in text.state_dict()) else ""  # transformers < 5.6
    missing, unexpected = text.load_state_dict({(k if k.startswith("text_projection") else prefix + k): v
                                                for k, v in state.items()}, strict=False, assign=True)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise SystemExit(f"transformers' {cls.__name__} does not take unfog's names: {missing=} {unexpected=}")
    for name, buffer in list(text.named_buffers()):  # position ids: a buffer, still on the meta device
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            text.get_submodule(owner).register_buffer(leaf, torch.arange(config.max_positions)[None],
                                                      persistent=False)
    return text.eval()


def build_diffusers(setup: Setup, states: dict[str, dict], tmp: Path):
    import transformers
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from model_checks import write_tokenizer_folder
    from oracles import diffusers_twin, vae_diffusers_config
    from unet_step import sdxl_extra

    with torch.device("meta"):
        unet = diffusers_twin(setup.unet, sample_size=setup.latent_side, **sdxl_extra(setup.unet))
        vae = DiffusersVAE(**vae_diffusers_config(setup.vae))
    ldm_unet = {f"model.diffusion_model.{k}": v for k, v in states["unet"].items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config)), strict=True, assign=True)
    ldm_vae = {f"first_stage_model.{k}": v for k, v in states["vae"].items()}
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config)), strict=True, assign=True)
    folder = write_tokenizer_folder(tmp / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)  # pads with EOS
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
                                            **SD_SCHEDULER)
    parts = dict(vae=vae.eval(), text_encoder=text_model(setup.text, states["text"]), tokenizer=tokenizer,
                 unet=unet.eval(), scheduler=scheduler)
    if setup.text_2 is None:
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")  # OpenCLIP: 0
    return StableDiffusionXLPipeline(**parts, text_encoder_2=text_model(setup.text_2, states["text_2"]),
                                     tokenizer_2=tokenizer_2, add_watermarker=False)


def status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def draw(side: str, pipe, setup: Setup, steps: int, latents: torch.Tensor) -> torch.Tensor:
    """The images of ``latents`` (B, 4, h, w), B per prompt, in [-1, 1]: (B, 3, size, size) float32."""
    if side == "unfog":
        return pipe(PROMPT, NEGATIVE, steps=steps, sampler="dpmpp_2m", spacing="karras", cfg_scale=7.5,
                    latents=latents, batch_size=len(latents), output="tensor").float()
    images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                  latents=latents, num_images_per_prompt=len(latents), height=setup.size, width=setup.size,
                  output_type="pt").images
    return images.float() * 2 - 1


def speed_up(side: str, pipe, compile: bool, fuse_qkv: bool) -> None:
    """``--compile`` and ``--fuse-qkv`` on one side, each side by its own means."""
    if fuse_qkv:
        pipe.fuse_qkv() if side == "unfog" else pipe.fuse_qkv_projections()
    if compile and side == "unfog":
        pipe.compile("strict")
    elif compile:
        options = {"mode": "reduce-overhead"} if pipe.device.type == "cuda" else {}  # as unfog's compile
        pipe.unet = torch.compile(pipe.unet, dynamic=False, **options)
        pipe.vae.decode = torch.compile(pipe.vae.decode, dynamic=False, **options)


class Meter:
    """Time and working memory of one image: the CPU's peak resident set, or CUDA's allocator."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self) -> "Meter":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
        else:
            self.before = status_mb("VmRSS")
            reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else status_mb("VmHWM")
        self.working_mb = peak - self.before


def run(dtype_name: str, setup: Setup, runs: int, device: str = "cpu", batch: int = 1, compile: bool = False,
        fuse_qkv: bool = False) -> dict:
    dtype = DTYPES[dtype_name]
    ours, states = build_unfog(setup, dtype, device)
    weights_mb = sum(v.numel() * v.element_size() for s in states.values() for v in s.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        theirs = build_diffusers(setup, states, Path(tmp)).to(device)
    del states
    pipes = {"unfog": ours, "diffusers": theirs}
    for side in SIDES:
        speed_up(side, pipes[side], compile, fuse_qkv)
    side = setup.latent_side
    latents = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    times = {s: [] for s in SIDES}
    working = {s: [] for s in SIDES}
    images = {}
    with torch.inference_mode():
        for side in SIDES:  # warm-up: first-call allocations, kernels; compiled, the compilation and graphs
            for _ in range(2 if compile else 1):
                draw(side, pipes[side], setup, 2, latents)
        order = [SIDES[(k + (k // 2)) % 2] for k in range(2 * runs)]  # u, d, d, u, u, d, ...
        for side in order:
            with Meter(device) as meter:
                images[side] = draw(side, pipes[side], setup, setup.steps, latents)
            times[side].append(meter.seconds)
            working[side].append(meter.working_mb)
            print(f"  {dtype_name} {side}: {times[side][-1]:.2f} s, working {working[side][-1]:.0f} MB", flush=True)
    difference = ((images["unfog"] - images["diffusers"]).abs().max() / images["diffusers"].abs().max()).item()
    return dict(times={s: statistics.median(v) for s, v in times.items()},
                working={s: max(v) for s, v in working.items()}, weights_mb=weights_mb, difference=difference)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--runs", type=int, default=2, help="timed images per side and dtype (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, every core)")
    p.add_argument("--quick", action="store_true", help="tiny models at 64 px, 4 steps: checks the script")
    p.add_argument("--model", default="sd15", choices=list(SETUPS),
                   help="sd15: 512 px, 20 steps (default); sdxl: SDXL base, 1024 px, 30 steps")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--compile", action="store_true", help="both sides through torch.compile")
    p.add_argument("--fuse-qkv", action="store_true", help="both sides with fused attention projections")
    args = p.parse_args(argv)
    if args.runs < 1 or args.batch < 1:
        p.error(f"--runs and --batch must be at least 1, got {args.runs} and {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = (QUICK_SETUPS if args.quick else SETUPS)[args.model]
    import diffusers
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"CPU: {cpu_flags()}, {torch.get_num_threads()} threads")
    extras = ", ".join(name for name, on in (("compiled", args.compile), ("fused QKV", args.fuse_qkv)) if on)
    print(f"{where}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
          f"{args.model}{' (tiny models)' if args.quick else ''} at {setup.size} px, {setup.steps} steps DPM++ 2M Karras, "
          f"CFG 7.5, batch {args.batch}{', ' + extras if extras else ''}; median of {args.runs} calls per side",
          flush=True)
    rows = {name: run(name, setup, args.runs, args.device, args.batch, args.compile, args.fuse_qkv)
            for name in args.dtypes}
    print("\n| dtype | unfog s / call | diffusers s / call | time ratio | unfog it/s | unfog images/s | "
          "diffusers images/s | unfog working MB | diffusers working MB | weights MB | image difference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t, w = r["times"], r["working"]
        print(f"| {name} | {t['unfog']:.2f} | {t['diffusers']:.2f} | {t['unfog'] / t['diffusers']:.2f} | "
              f"{setup.steps / t['unfog']:.1f} | {args.batch / t['unfog']:.2f} | {args.batch / t['diffusers']:.2f} | "
              f"{w['unfog']:.0f} | {w['diffusers']:.0f} | {r['weights_mb']:.0f} | {r['difference']:.1e} |")


if __name__ == "__main__":
    main()
