"""Stable Diffusion 1.x / 2.x and SDXL base / refiner: txt2img, img2img, inpainting and the
base-to-refiner hand-off, as one thin composition of the models and the diffusion core.

    prompt --encode_prompt--> context (+ SDXL's vector y)               conditioning.py
    noise, or the VAE latents of init_image + noise --> x at sigmas[0]  start.py
    Denoiser(U-Net) -> CFGDenoiser -> [InpaintDenoiser] -> sampler      diffusion/
    x / scaling_factor --VAE decode--> images in [-1, 1] --> PIL        inputs.py

Latents are the VAE's times ``vae.config.scaling_factor``, in the samplers' variable
x = x0 + sigma * eps. Random draws come from one CPU generator seeded with ``seed``, in
diffusers' order (start.py), so a seed gives diffusers' start exactly. Where diffusers'
conventions differ, see docs/samplers.md.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from ..checkpoint.controlnet import check_controlnet_family
from ..checkpoint.embeddings import Embedding, read_embedding
from ..checkpoint.lora import read_lora
from ..conditioning import SIZE_EMBED_DIM, EncoderFamily, embedding_words, encode_prompt
from ..diffusion import (PREDICTIONS, SPACINGS, CFGDenoiser, Denoiser, DiscreteSchedule, InpaintDenoiser,
                         get_sigmas, resolve_sampler, truncation_sigma)
from ..diffusion.repaint import check_repaint, sample_repaint
from ..choices import check_choice
from ..models.backbone import Backbone, requires_unet
from ..models.clip_text import CLIPTextEncoder
from ..models.controlnet import HINT_DOWNSCALE
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import FeatureCache
from ..models.vae import AutoencoderKL
from ..nn.attention import fuse_projections
from ..nn.token_merging import TokenMerger, TokenMerging
from . import inputs, start
from .compiled import COMPILE_MODES, CompiledCall
from .controlnet import Control, ControlRun, prepare_hint
from .hypernetwork import AppliedHypernetwork, HypernetworkStack
from .lora import AppliedLora, LoraStack, warn_on_stderr
from .precision import VAEDtype, resolve_vae_dtype, use_device_layout
from .vae_file import fit_vae, read_vae
from .sdxl import vector_conditions
from .super_resolution import augmentation_level, check_super_resolution_unet, condition
from .windows import sigma_window

Output = Literal["pil", "tensor", "latent"]
EncodeMode = Literal["sample", "mean"]
ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
            "sdxl_refiner": ("text_encoder_2",)}


def sd_schedule() -> DiscreteSchedule:
    """The noise schedule of every official Stable Diffusion model: scaled_linear 0.00085..0.012, T = 1000."""
    return DiscreteSchedule.make("scaled_linear", 1000, 0.00085, 0.012)


class StableDiffusion:
    """The models of one checkpoint and how to draw images from them; ``__call__`` does the work.

    unet: the denoising network (``models.backbone``): a U-Net with 4 input channels, or 9 for
        inpainting models (latents, mask, masked-image latents); or a DiT (unfog's own DiT models,
        without ControlNet, LoRA, hypernetworks, DeepCache or token merging, which are U-Net's).
    family: "sd1" | "sd2" | "sdxl" | "sdxl_refiner": how prompts are encoded (conditioning.py)
        and which text encoders are needed (SDXL: both; the refiner: ``text_encoder_2`` only).
    schedule, prediction, spacing, steps_offset: the model's scheduler config (SD's by default).
    vae_dtype: the VAE's dtype policy (``precision.resolve_vae_dtype``): "auto" casts the VAE to
        float32 for a float16 U-Net (fp16 VAE decoders overflow), else to the U-Net's dtype.
    native_size: the default image side (None: the family's, 512 / 768 / 1024); unfog's own
        text-to-image models set the size they were trained at.
    size_conditioning: an "sd1" / "sd2" model whose U-Net also takes SDXL's vector ``y`` (unfog's
        own models trained with ``size_conditioning``): y = [the text encoder's pooled output,
        Fourier features of original size, crop top-left, target size], as SDXL base builds it.
    low_res: a super-resolution model (``super_resolution.py``) of images of this side: its calls
        take ``low_res_image`` and ``noise_augmentation``.
    """

    def __init__(self, unet: Backbone, vae: AutoencoderKL, tokenizer: CLIPTokenizer, family: EncoderFamily, *,
                 text_encoder: CLIPTextEncoder | None = None, text_encoder_2: CLIPTextEncoder | None = None,
                 schedule: DiscreteSchedule | None = None, prediction: str = "eps", spacing: str = "leading",
                 steps_offset: int = 1, vae_dtype: VAEDtype = "auto", native_size: int | None = None,
                 size_conditioning: bool = False, low_res: int | None = None):
        check_choice("family", family, tuple(ENCODERS))
        vae = vae.to(resolve_vae_dtype(next(unet.parameters()).dtype, vae_dtype))
        self.unet, self.vae, self.tokenizer, self.family = unet.eval(), vae.eval(), tokenizer, family
        use_device_layout(self.unet, self.vae)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        missing = [name for name in ENCODERS[family] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"family {family!r} needs {' and '.join(missing)}")
        latent = vae.config.latent_channels
        self.low_res = low_res
        if low_res is not None:
            requires_unet(unet, "A super-resolution model")
            check_super_resolution_unet(unet.config, latent)
        elif unet.config.in_channels not in (latent, 2 * latent + 1):
            raise ValueError(f"the U-Net takes {unet.config.in_channels} input channels; need {latent} "
                             f"(latents) or {2 * latent + 1} (inpainting: latents, mask, masked image)")
        self.schedule = schedule or sd_schedule()
        self.prediction = check_choice("prediction type", prediction, PREDICTIONS)
        self.spacing, self.steps_offset = check_choice("sigma spacing", spacing, SPACINGS), steps_offset
        self.native_size = native_size
        self._lora_stack: LoraStack | None = None
        self._embeddings: dict[str, Embedding] = {}
        self._bundled: list[Embedding] = []  # those of _embeddings that LoRAs bundled (Embedding compares by identity)
        self._hypernetwork_stack = HypernetworkStack(self.unet)
        self._own_vae, self.vae_file = self.vae, None  # vae_file: the VAE loaded by load_vae, if any
        self.size_conditioning = size_conditioning
        if size_conditioning:
            self._check_size_conditioning()
        self.super_resolution: StableDiffusion | None = None  # a cascade's second stage (cascade.py)
        self.super_resolution_settings = None
        self._unet_call: Callable | None = None  # compile(): the compiled U-Net and VAE decoder
        self._decode_call: Callable | None = None
        self.compile_mode = "off"
        self.fused_qkv = False  # fuse_qkv()

    def compile(self, mode: str = "auto", warn: Callable[[str], None] | None = None) -> "StableDiffusion":
        """Run the U-Net and the VAE decoder through ``torch.compile`` from now on (``pipelines.
        compiled``): mode "auto" falls back to eager, saying why through ``warn``, where compiling
        is not possible; "strict" raises; "off" undoes it. Returns the pipeline."""
        check_choice("compile mode", mode, COMPILE_MODES)
        self.compile_mode = mode
        if mode == "off":
            self._unet_call = self._decode_call = None
            return self
        warn = warn or warn_on_stderr
        self._unet_call = CompiledCall(self.unet, "U-Net", self.device, mode, warn)
        self._decode_call = CompiledCall(lambda z: self.vae.decode(z), "VAE decoder", self.device, mode, warn)
        return self

    @classmethod
    def from_components(cls, c, tokenizer=None, vae_dtype: VAEDtype = "auto") -> "StableDiffusion":
        """From what ``unfog.checkpoint`` loads (``Components``); the family is read off the encoders."""
        if c.text_encoder is not None and c.text_encoder_2 is not None:
            family = "sdxl"
        elif c.text_encoder_2 is not None:
            family = "sdxl_refiner"
        else:
            family = "sd2" if c.text_encoder.config.activation == "gelu" else "sd1"  # OpenCLIP-H vs CLIP-L
        s = c.family.scheduler
        schedule = DiscreteSchedule.make(s.beta_schedule, s.num_timesteps, s.beta_start, s.beta_end,
                                         zero_terminal_snr=s.zero_terminal_snr)
        return cls(c.unet, c.vae, tokenizer or c.tokenizer or CLIPTokenizer.from_bpe_file(), family,
                   text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, schedule=schedule,
                   prediction=c.prediction, spacing=s.spacing, steps_offset=s.steps_offset, vae_dtype=vae_dtype)

    @classmethod
    def from_text2image(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "StableDiffusion":
        """The pipeline of an unfog text-to-image model file (``latent_model``): an "sd1"-family
        pipeline on the file's schedule, prediction type and trained size."""
        from .latent_model import load_parts

        return cls.from_parts(load_parts(path, dtype)).to(device)

    @classmethod
    def from_parts(cls, parts) -> "StableDiffusion":
        """From ``latent_model.load_parts``' (network, vae, text encoder, tokenizer, info, metadata)."""
        unet, vae, text_encoder, tokenizer, info, _ = parts
        return cls(unet, vae, tokenizer, "sd1", text_encoder=text_encoder, schedule=info.make_schedule(),
                   prediction=info.prediction, native_size=info.image_size,
                   size_conditioning=info.size_conditioning, low_res=info.low_res)

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             family: str | None = None, prediction: str | None = None, use_ema: bool = False,
             vae_dtype: VAEDtype = "auto") -> "StableDiffusion":
        """The pipeline of a checkpoint: an official single file (``.safetensors``, ``.ckpt``; SD 1.x,
        2.x, SDXL base or refiner, inpainting variants) or a diffusers folder. The family is detected
        from the weights (``family=`` names it, e.g. "SD15"; see ``unfog.checkpoint.FAMILIES``). The
        models are ``dtype`` on ``device`` whatever the file stores; ``prediction`` overrides the
        family's ("eps" for SD 2.x 512-base files); ``use_ema`` takes the file's EMA U-Net.

        unfog's own pixel models (``unfog train``) are not Stable Diffusion checkpoints: a ValueError
        points to ``PixelDiffusion.load``."""
        from ..checkpoint import load_components
        from .cascade import is_cascade, load_cascade
        from .latent_model import is_text2image_model
        from .pixel import is_pixel_model

        path = Path(path)
        if is_text2image_model(path):
            return cls.from_text2image(path, dtype, device)
        if is_cascade(path):
            return load_cascade(path, dtype, device)
        if is_pixel_model(path):
            raise ValueError(f"{path} is an unfog pixel model, not a Stable Diffusion checkpoint; load it with "
                             f"PixelDiffusion.load or `unfog sample --model {path}`")
        c = load_components(path, family, dtype, use_ema, prediction)
        if c.unet is None or c.vae is None or (c.text_encoder is None and c.text_encoder_2 is None):
            held = ", ".join(n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(c, n) is not None)
            raise ValueError(f"{path} holds only {held} ({c.family.name}); a pipeline needs a U-Net, a VAE and "
                             "its text encoder(s): give a full checkpoint")
        return cls.from_components(c, vae_dtype=vae_dtype).to(device)

    def to(self, device: str | torch.device) -> "StableDiffusion":
        """Move every model to ``device``; returns the pipeline."""
        for module in (self.unet, self.vae, self._own_vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device)
        self._hypernetwork_stack.to(device)
        use_device_layout(self.unet, self.vae, self._own_vae)
        if self.super_resolution is not None:
            self.super_resolution.to(device)
        return self

    def fuse_qkv(self, enabled: bool = True) -> "StableDiffusion":
        """Compute the U-Net's attention projections that read one input as one matmul: q, k and v
        of self-attention, k and v of cross-attention (``nn.attention.fuse_projections``: exact,
        one kernel launch instead of three or two, for a copy of those weights: 107 MiB for SD 1.5
        in 16 bits, 1.2 GiB for SDXL). Off by default: on the CPU it measured no faster
        (docs/benchmarks.md, "Fused QKV"); on CUDA it is not measured yet. Returns the pipeline."""
        self.fused_qkv = enabled
        fuse_projections(self.unet, enabled)
        return self

    def attach_super_resolution(self, stage: "StableDiffusion | None", settings=None) -> None:
        """Draw every image of this model on through ``stage``, a super-resolution model of this
        model's size (``cascade.py``), with ``settings`` (``cascade.StageSettings``); None detaches."""
        from .cascade import StageSettings

        if stage is not None and stage.low_res != self.default_size:
            raise ValueError(f"the second stage upsamples {stage.low_res} px images, this model draws "
                             f"{self.default_size} px ones" if stage.low_res else
                             "the second stage must be a super-resolution model (trained with text2image.low_res)")
        self.super_resolution, self.super_resolution_settings = stage, settings or StageSettings()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------ LoRAs (pipelines/lora.py)

    @property
    def loras(self) -> list[AppliedLora]:
        """The LoRAs merged into the models, in the order they were loaded."""
        return list(self._lora_stack.applied) if self._lora_stack is not None else []

    def load_lora(self, path: str | Path, weight: float = 1.0, text_encoder_weight: float | None = None,
                  name: str | None = None, warn: Callable[[str], None] | None = None) -> AppliedLora:
        """Merge a LoRA / LyCORIS file (kohya, A1111, diffusers, PEFT or LyCORIS keys) into the
        models: its U-Net adapters times ``weight``, its text-encoder adapters times
        ``text_encoder_weight`` (default ``weight``). Several stack; a bad file changes nothing.

        The textual-inversion embeddings the file bundles (``bundle_emb`` keys) become words prompts
        can use, at full strength whatever the weights, as in A1111; ``unload_loras`` removes them.
        As in A1111, an embedding already loaded under the same name (``load_embedding``) is kept and
        the bundled one skipped; one bundled by an earlier LoRA is replaced. Each is said through
        ``warn``, as are bundled embeddings for other text widths (skipped)."""
        requires_unet(self.unet, "LoRA")
        if self._lora_stack is None:
            models = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
            self._lora_stack = LoraStack(models, f"this {self.family} model")
        lora = read_lora(path)
        embedding_words(list(lora.embeddings.values()), self.tokenizer)  # names with no tokens: refused before merging
        applied = self._lora_stack.add_file(lora, weight, text_encoder_weight, name, warn)
        for e in lora.embeddings.values():
            self._add_bundled(e, applied.name, warn or warn_on_stderr)
        return applied

    def _add_bundled(self, e: Embedding, lora: str, warn: Callable[[str], None]) -> None:
        same = tuple(self.tokenizer.encode_clip(e.name))
        mine = [o for o in self._embeddings.values() if tuple(self.tokenizer.encode_clip(o.name)) == same
                and o not in self._bundled]
        if mine:
            warn(f"LoRA {lora}: its bundled embedding {e.name} is skipped: {mine[0].name} ({mine[0].path or 'in memory'})"
                 " is loaded already and stays, as in A1111")
            return
        if self.add_embedding(e, warn) is not None:
            self._bundled.append(e)

    def unload_loras(self) -> None:
        """Take every LoRA off, restoring the exact original weights, and remove the embeddings they
        bundled (those loaded with ``load_embedding`` stay)."""
        if self._lora_stack is not None:
            self._lora_stack.clear()
        self._embeddings = {k: e for k, e in self._embeddings.items() if e not in self._bundled}
        self._bundled.clear()

    # ------------------------------------------------------------ textual inversion

    @property
    def embeddings(self) -> list[Embedding]:
        """The textual-inversion embeddings a prompt can call by name, in the order loaded."""
        return list(self._embeddings.values())

    def load_embedding(self, path: str | Path, name: str | None = None,
                       warn: Callable[[str], None] | None = None) -> Embedding | None:
        """Read a textual-inversion file (``checkpoint.embeddings``: A1111, diffusers, kohya, SDXL,
        A1111 PNG / WebP) and make its name (default: as A1111 names it, the file's stem) a word
        prompts can use. An embedding for other text widths is skipped: None, and one message
        through ``warn`` naming the family it is for. A name already loaded (compared as the
        tokenizer sees it, so case aside) is replaced: the later file wins, and ``warn`` says so."""
        return self.add_embedding(read_embedding(path, name), warn)

    def add_embedding(self, e: Embedding, warn: Callable[[str], None] | None = None) -> Embedding | None:
        """``load_embedding`` for an embedding already in memory (e.g. one being trained)."""
        warn = warn or (lambda message: None)
        where = e.path or "in memory"
        encoders = [getattr(self, n) for n in ENCODERS[self.family]]
        widths = tuple(enc.config.width for enc in encoders)
        if e.for_widths(widths) is None:
            warn(f"skipped embedding {e.name} ({where}): it is for {e.family}, this model's text encoders are "
                 f"{' + '.join(map(str, widths))} wide")
            return None
        embedding_words([e], self.tokenizer)  # a name with no tokens is refused before anything changes
        same = tuple(self.tokenizer.encode_clip(e.name))
        for old in [o for o in self._embeddings.values() if tuple(self.tokenizer.encode_clip(o.name)) == same]:
            warn(f"embedding {e.name} ({where}) replaces {old.name} ({old.path or 'in memory'}): the later one wins")
            del self._embeddings[old.name]
        self._embeddings[e.name] = e
        return e

    def unload_embeddings(self) -> None:
        """Remove every embedding, those LoRAs bundled too."""
        self._embeddings.clear()
        self._bundled.clear()

    # ------------------------------------------------------------ hypernetworks (pipelines/hypernetwork.py)

    @property
    def hypernetworks(self) -> list[AppliedHypernetwork]:
        """The hypernetworks applied to the U-Net's attention, in the order they were loaded."""
        return list(self._hypernetwork_stack.applied)

    def load_hypernetwork(self, path: str | Path, weight: float = 1.0, name: str | None = None) -> AppliedHypernetwork:
        """Apply a hypernetwork file (A1111 ``.pt`` or unfog ``.safetensors``) with multiplier
        ``weight`` to every attention layer; several chain. A bad file changes nothing."""
        requires_unet(self.unet, "A hypernetwork")
        return self._hypernetwork_stack.add(path, weight, name)

    def unload_hypernetworks(self) -> None:
        """Take every hypernetwork off (the U-Net's weights were never changed)."""
        self._hypernetwork_stack.clear()

    # ------------------------------------------------------------ VAE (pipelines/vae_file.py)

    def load_vae(self, path: str | Path | None) -> None:
        """Encode and decode with the VAE in ``path`` instead of the model's own, as A1111's "SD VAE"
        setting does: a bare VAE file, a checkpoint, a diffusers ``AutoencoderKL`` folder or an unfog
        autoencoder (``vae_file.py``). None goes back to the model's own. The latent space stays the
        U-Net's: the VAE must match its latent channels and downsampling, and it is used with the
        model's scaling factor. A bad file changes nothing."""
        if path is None:
            self.vae, self.vae_file = self._own_vae, None
            return
        vae = fit_vae(read_vae(path), self._own_vae, str(path))
        use_device_layout(vae)
        self.vae, self.vae_file = vae, Path(path)

    @property
    def inpainting_unet(self) -> bool:
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor (8), so that the latents have
        whole sides; the U-Net takes latents of any size (SD 1.x / 2.x need no 64-pixel steps)."""
        return self.vae.config.downsample_factor

    @property
    def default_size(self) -> int:
        if self.native_size is not None:
            return self.native_size
        if self.family.startswith("sdxl"):
            return 1024
        return 768 if self.family == "sd2" and self.prediction == "v" else 512

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int = 20,
                 sampler: str = "euler", spacing: str | None = None, cfg_scale: float = 7.0,
                 guidance_rescale: float = 0.0, cfg_truncation: float = 1.0, deep_cache: int = 1,
                 deep_cache_branch: int = 0, deep_cache_start: float = 0.0, token_merging: float = 0.0,
                 token_merging_max_downsample: int = 1,
                 repaint: tuple[int, int] | None = None, low_res_image=None, noise_augmentation: float = 0.1,
                 seed: int = 0, width: int | None = None, height: int | None = None,
                 batch_size: int = 1, clip_skip: int | None = None, latents: Tensor | None = None,
                 init_image=None, init_latents: Tensor | None = None, strength: float = 0.8, mask=None,
                 masked_content: str = "original",
                 encode: EncodeMode = "sample",
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, denoising_start: float | None = None,
                 denoising_end: float | None = None, controls: list[Control] | tuple[Control, ...] = (),
                 output: Output = "pil", callback=None, warn: Callable[[str], None] | None = None,
                 **sampler_options):
        """Images for ``prompt`` (``batch_size`` per prompt): PIL images, a tensor (B, 3, H, W) in
        [-1, 1] (``output="tensor"``), or the final latents (``output="latent"``).

        txt2img: start from unit noise (``latents`` if given, else drawn) times sqrt(1 + sigma_0^2).
        img2img (``init_image``): run the last int(steps * strength) steps, starting from the VAE
            latents of the image (a posterior sample, or its mean with ``encode="mean"``) plus
            sigma * noise; ``init_latents`` (B, C, h, w), scaled as the U-Net's, start there
            instead of an encoded image (hires fix's latent upscalers).
        inpainting (``init_image`` and ``mask``, 1 = paint): a 9-channel U-Net sees the mask and the
            masked image's latents; a 4-channel one is kept to the image outside the mask at every
            step (``InpaintDenoiser``). At strength 1 the start is pure noise, as txt2img.
            ``masked_content`` (A1111's "Masked content") is where the masked area starts from:
            "original" (the image), "fill" (the image with the masked area filled smoothly from
            its surroundings, ``inputs.fill_masked``), "latent noise" (the run's own noise, as
            A1111's image seed gives it) or "latent nothing" (zero latents).
        ``cfg_truncation=f``: classifier-free guidance for the first fraction f of the steps, the
            conditional pass alone from the sigma of step ceil(f * steps) on (1: every step guided).
        ``deep_cache=N``: DeepCache, the whole U-Net every N-th evaluation and its shallow blocks
            down to skip level ``deep_cache_branch`` in between (``models.unet.FeatureCache``);
            the first fraction ``deep_cache_start`` of the steps all run in full (the layout is
            decided there), and the interval counts from the last of them.
        ``token_merging=r``: ToMe for SD, a fraction r of the tokens merged before each self-attention
            (``nn.token_merging``) of the levels at most ``token_merging_max_downsample`` times
            smaller than the latents; top-left destinations, as A1111 applies it.
        ``low_res_image``: what a super-resolution model (``low_res``) upsamples, (B or 1, 3, h, w) in
            [-1, 1] or a PIL image, brought to its ``low_res`` side, noised to the fraction
            ``noise_augmentation`` of the schedule (``super_resolution.py``); required by such a model.
        ``repaint=(j, r)``: inpainting by RePaint's resampling (``diffusion.repaint``) instead of the
            per-step blend: jump length j, r jumps; with sampler "DDPM" (eta 1) or "DDIM" (eta 0), a
            4-channel U-Net and strength 1; ``steps`` is the grid the jumps run on.
        hand-off: ``denoising_end=f`` stops where a fraction f of the timesteps is done (use it
            with ``output="latent"``); ``denoising_start=f`` with those ``latents`` goes on from there.
        SDXL (and ``size_conditioning`` models): size and crop conditioning (defaults (height, width),
            (0, 0), (height, width)); the refiner's aesthetic scores. Other keyword arguments go to
            the sampler (e.g. ``eta``).
        """
        choice = resolve_sampler(sampler)
        self._check_options(choice.name, steps=steps, output=output, encode=encode, strength=strength, repaint=repaint,
                            inpainting=init_image is not None and mask is not None, cfg_truncation=cfg_truncation,
                            deep_cache_start=deep_cache_start, batch_size=batch_size,
                            savings=((controls, "ControlNet"), (deep_cache != 1, "DeepCache"),
                                     (token_merging, "Token merging")))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(prompts) * batch_size
        image, pixel_mask = start.checked_images(self, init_image, mask, latents, init_latents, denoising_start,
                                                 masked_content)
        height, width = start.output_size(self, height, width, image, latents if init_latents is None else init_latents)
        f = self.vae.config.downsample_factor
        latent_shape = (n, self.vae.config.latent_channels, height // f, width // f)

        img2img = image is not None or init_latents is not None
        sigmas = self.sigmas(steps, sampler, spacing, strength=strength if img2img else None,
                             denoising_start=denoising_start, denoising_end=denoising_end)
        y = dict(original_size=original_size or (height, width), crop=crops_coords_top_left,
                 target_size=target_size or (height, width), aesthetic_score=aesthetic_score,
                 negative_aesthetic_score=negative_aesthetic_score)
        cond, uncond = self._conditioning(prompts, negative_prompt, clip_skip, batch_size, y)
        control = self._control_run(controls, width, height, sigmas, warn)
        cache = (None if deep_cache == 1 else
                 self._feature_cache(deep_cache, deep_cache_branch, deep_cache_start, sigmas))
        merger = None if token_merging == 0 else TokenMerger(
            TokenMerging(token_merging, token_merging_max_downsample, random=False))
        if control is not None:  # which rows of a CFG batch are conditional (for guess mode)
            cond["cond_mark"], uncond["cond_mark"] = torch.ones(n, device=self.device), torch.zeros(n, device=self.device)

        g = torch.Generator().manual_seed(seed)
        if self.low_res is not None or low_res_image is not None:
            self._super_resolution(cond, uncond, low_res_image, noise_augmentation, n, (height, width), g)
        if denoising_start is not None:
            x, concat, blend = start.checked_latents(latents, latent_shape, self.device), {}, None
        else:
            x, concat, blend = start.start_latents(self, g, latent_shape, float(sigmas[0]), image, pixel_mask,
                                                   latents, strength, encode, masked_content, init_latents)
        guided = self._guided({**cond, **concat}, {**uncond, **concat}, cfg_scale, guidance_rescale, control,
                              truncation_sigma(sigmas, cfg_truncation), cache, merger)
        x = self._sample(choice, guided, x, sigmas, blend, repaint, steps, g, callback, sampler_options)
        if output == "latent":
            return x
        images = self.decode(x)
        if self.super_resolution is not None:
            from .cascade import second_stage

            images = second_stage(self, prompts, negative_prompt, images, batch_size, seed, callback)
        return images if output == "tensor" else inputs.to_pil(images)

    def _check_options(self, sampler: str, *, steps: int, output: str, encode: str, strength: float, repaint,
                       inpainting: bool, cfg_truncation: float, deep_cache_start: float, batch_size: int,
                       savings) -> None:
        """The call's options that need no input to check, each a one-line ValueError; ``savings``:
        (used, name) of the options that need a U-Net (not a DiT)."""
        check_choice("output", output, get_args(Output))
        check_choice("encode mode", encode, get_args(EncodeMode))
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if repaint is not None:
            self._check_repaint(repaint, sampler, steps, inpainting, strength)
        if not 0 <= cfg_truncation <= 1:
            raise ValueError(f"CFG truncation must be in [0, 1] (the fraction of the steps guided), got {cfg_truncation}")
        if not 0 <= deep_cache_start < 1:
            raise ValueError(f"DeepCache start must be in [0, 1) (the fraction of the steps run in full first), got "
                             f"{deep_cache_start}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for used, what in savings:
            if used:
                requires_unet(self.unet, what)

    def _feature_cache(self, interval: int, branch: int, fraction: float, sigmas: Tensor) -> FeatureCache:
        """DeepCache for a run over ``sigmas``: the calls of the first ceil(fraction * steps) steps
        (those at a timestep above the next step's) run in full."""
        first = math.ceil(fraction * (len(sigmas) - 1) - 1e-9)  # 0.3 * 20 = 6.000000000000001 is step 6
        if first == 0:
            return FeatureCache(interval, branch)
        t = Denoiser(self._network, self.schedule, self.prediction).timestep(sigmas[first : first + 1])
        return FeatureCache(interval, branch, full_above=float(t[0]))

    def _sample(self, choice, guided, x: Tensor, sigmas: Tensor, blend, repaint, steps: int, g: torch.Generator,
                callback, sampler_options: dict) -> Tensor:
        """The sampler's run from x over sigmas; a 4-channel inpainting run (``blend``: the latent
        mask, the known latents and the start noise) blends the known region at every step, or,
        with ``repaint``, runs RePaint's resampling on the model's timestep grid instead."""
        if repaint is not None:
            small, known, noise = blend
            return sample_repaint(guided, noise, self.schedule, known, 1 - small, steps=steps,
                                  jump_length=repaint[0], jump_n_sample=repaint[1],
                                  eta=1.0 if choice.name == "ddpm" else 0.0, generator=g, callback=callback)
        if blend is not None:
            guided = InpaintDenoiser(guided, *blend)
        return choice.fn(guided, x, sigmas, generator=g, callback=callback, **{**choice.options, **sampler_options})

    @torch.no_grad()
    def encode(self, image: Tensor, generator: torch.Generator | None = None, mode: EncodeMode = "mean") -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the U-Net's latents (scaled, float32, on its device):
        the VAE posterior's mean, or with ``mode="sample"`` a sample drawn from ``generator``."""
        posterior = self.vae.encode(image.to(next(self.vae.parameters()).device))
        z = posterior.sample(generator) if mode == "sample" else posterior.mode()
        return (z * self.vae.config.scaling_factor).to(self.device, torch.float32)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) float32 images in [-1, 1] on the CPU from the U-Net's latents (also the
        ``denoised`` of a sampler callback: a preview, or what an interrupted run has reached)."""
        vae_device = next(self.vae.parameters()).device
        decode = self._decode_call or self.vae.decode
        return decode(latents.to(vae_device) / self.vae.config.scaling_factor).clamp(-1, 1).float().cpu()

    def sigmas(self, steps: int, sampler: str = "euler", spacing: str | None = None, *, strength: float | None = None,
               denoising_start: float | None = None, denoising_end: float | None = None) -> Tensor:
        """The sigmas a run with these settings steps through (its step count is ``len - 1``):
        ``spacing``, else the sampler name's (e.g. "DPM++ 2M Karras"), else the model's; then the
        img2img ``strength`` (None for txt2img) or hand-off window (``windows.py``)."""
        spacing = self.spacing_for(sampler, spacing)
        full = get_sigmas(self.schedule, steps, spacing, steps_offset=self.steps_offset)
        return sigma_window(self.schedule, full, strength=strength, denoising_start=denoising_start,
                            denoising_end=denoising_end)

    def spacing_for(self, sampler: str, spacing: str | None = None) -> str:
        """The spacing a run uses: ``spacing``, else the sampler name's, else the model's."""
        return spacing or resolve_sampler(sampler).spacing or self.spacing

    # ---- pieces ------------------------------------------------------------------------------
    def _network(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                 concat: Tensor | None = None, cond_mark: Tensor | None = None,
                 control: ControlRun | None = None, cache: FeatureCache | None = None,
                 merger: TokenMerger | None = None) -> Tensor:
        """The U-Net on the VP-scaled latents; inpainting U-Nets also get [mask, masked latents].
        With ``control``, the ControlNets see the same latents (without the inpainting channels),
        timestep and conditioning, and their residuals go in with this call."""
        residuals = None if control is None else control.residuals(x, t, context, y, cond_mark)
        if concat is not None:
            x = torch.cat([x, concat.to(x)], dim=1)  # (B, 4 + 1 + 4, h, w)
        network = self._unet_call or self.unet
        if control is None and cache is None and merger is None:
            return network(x, t, context, y)  # what every backbone takes (models.backbone)
        return network(x, t, context, y, control=residuals, cache=cache, merger=merger)

    def _control_run(self, controls, width: int, height: int, sigmas: Tensor, warn) -> ControlRun | None:
        """The run's ControlNet units checked against this model, their hints at 8x the latent size
        (``HINT_DOWNSCALE``): first to the output size by each unit's resize mode (said if it
        changes), then, for a VAE whose factor is not 8, stretched to the ControlNet's input size,
        as the trainer does (an internal step, not the user's concern)."""
        if not controls:
            return None
        for c in controls:
            if not isinstance(c, Control):
                raise TypeError(f"controls must be Control units (unfog.pipelines.controlnet), got {type(c).__name__}")
            check_controlnet_family(c.model, self.unet)
        f = self.vae.config.downsample_factor
        size = (HINT_DOWNSCALE * (width // f), HINT_DOWNSCALE * (height // f))
        hints = [prepare_hint(prepare_hint(c.image, width, height, c.resize_mode, warn), *size, "just_resize")
                 .to(self.device) for c in controls]
        timesteps = Denoiser(self._network, self.schedule, self.prediction).timestep(sigmas[:-1])
        return ControlRun(list(controls), hints, timesteps)

    def _guided(self, cond: dict, uncond: dict, scale: float, rescale: float, control: ControlRun | None = None,
                cond_only_below: float = -1.0, cache: FeatureCache | None = None,
                merger: TokenMerger | None = None):
        """D(x, sigma) with classifier-free guidance (the conditional pass alone at sigma <=
        ``cond_only_below``); scale 1 is the conditional denoiser alone."""
        network = partial(self._network, control=control, cache=cache, merger=merger)
        den = Denoiser(network, self.schedule, self.prediction)
        if scale == 1:
            return lambda x, sigma: den(x, sigma, **cond)
        return CFGDenoiser(den, cond, uncond, scale, rescale=rescale, rescale_space=self.prediction,
                           cond_only_below=cond_only_below)

    def _conditioning(self, prompts, negative_prompt, clip_skip, per_prompt, y) -> tuple[dict, dict]:
        encoders = [getattr(self, name) for name in ENCODERS[self.family]]
        c = encode_prompt(self.family, encoders, self.tokenizer, prompts, negative_prompt, clip_skip=clip_skip,
                          with_pooled=self.size_conditioning, embeddings=self.embeddings)
        cond, uncond = {"context": c.context}, {"context": c.negative_context}
        if self.family in ("sdxl", "sdxl_refiner") or self.size_conditioning:
            vector = "sdxl" if self.size_conditioning else self.family  # the base's sizes and crop
            cond["y"], uncond["y"] = vector_conditions(vector, c.pooled, c.negative_pooled, **y)
        device = self.device
        expand = lambda d: {k: v.repeat_interleave(per_prompt, 0).to(device) for k, v in d.items()}  # noqa: E731
        return expand(cond), expand(uncond)

    def _super_resolution(self, cond: dict, uncond: dict, image, level: float, n: int, size: tuple[int, int],
                          g: torch.Generator) -> None:
        """Add a super-resolution model's inputs to both passes of guidance (the low-resolution
        image is no part of the prompt: the unconditional pass sees it too)."""
        if self.low_res is None:
            raise ValueError("low_res_image is for super-resolution models; this model draws from noise")
        if image is None:
            raise ValueError(f"this is a super-resolution model: give low_res_image, the {self.low_res} px image "
                             "it upsamples")
        low = inputs.batch_of(inputs.image_tensor(image), n, "low_res_image")
        z, y = condition(low, self.low_res, size, augmentation_level(level, self.schedule), self.schedule, g)
        for d in (cond, uncond):
            d["concat"], d["y"] = z.to(self.device), y.to(self.device)

    def _check_size_conditioning(self) -> None:
        if self.family not in ("sd1", "sd2"):
            raise ValueError(f"size_conditioning is for the sd1 / sd2 families (SDXL has its own), "
                             f"got {self.family!r}")
        te = self.text_encoder.config
        want = (te.projection_dim or te.width) + 6 * SIZE_EMBED_DIM
        cfg = self.unet.config
        if cfg.num_classes != "sequential" or cfg.adm_in_channels != want:
            raise ValueError(f"size_conditioning needs a U-Net with num_classes='sequential' and adm_in_channels "
                             f"{want} (pooled text output + 6 * {SIZE_EMBED_DIM}), got num_classes="
                             f"{cfg.num_classes!r}, adm_in_channels={cfg.adm_in_channels}")

    def _check_repaint(self, repaint, sampler: str, steps: int, inpainting: bool, strength: float) -> None:
        """The runs RePaint can serve, each other a one-line ValueError."""
        if not (isinstance(repaint, tuple) and len(repaint) == 2 and all(isinstance(v, int) for v in repaint)):
            raise ValueError(f"repaint must be (jump_length, jump_n_sample), two integers, got {repaint!r}")
        if not inpainting or self.inpainting_unet:
            raise ValueError("RePaint inpaints with an ordinary 4-channel U-Net: give init_image and mask"
                             + (" (this is a 9-channel inpainting U-Net, which sees the mask itself)"
                                if self.inpainting_unet else ""))
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"RePaint runs on the DDPM (eta 1) or DDIM (eta 0) step, not sampler {sampler!r}: "
                             "pass sampler='DDPM' or 'DDIM'")
        if strength != 1:
            raise ValueError(f"RePaint starts from noise: strength must be 1, got {strength}")
        check_repaint(steps, *repaint, self.schedule.num_timesteps)
