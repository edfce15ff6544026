"""Stage 2 of a latent diffusion model (Rombach et al. 2022, sec. 3.3): a U-Net with
cross-attention learns to denoise the latents of a trained, frozen autoencoder, conditioned on
a CLIP-style text transformer that trains with it (the LDM paper's text-to-image model trained
its BERT-like encoder jointly) or stays frozen. A ``model`` preset named ``DIT_*`` trains a DiT
with cross-attention instead (``models.dit``; Peebles & Xie 2023), on the same loss and data.

Each step: the global batch's captions are dropped to "" with probability ``cond_dropout``
(so the same network is the unconditional model that classifier-free guidance needs), the
images are encoded to latents z = scaling_factor * (mean + std * n), and the usual diffusion
loss is taken on z. The tokenizer is CLIP's BPE restricted to the tokens of the training
captions (``SubVocabTokenizer``), and the prompt is encoded exactly as the "sd1" pipeline
encodes it at inference (77 tokens, padded with end-of-text, last layer normed).

Options (docs/training.md, "Buckets, crops and size conditioning"): ``buckets`` trains an image
folder in aspect-ratio buckets, each batch one bucket (``BucketBatches``); ``size_conditioning``
adds SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): the U-Net gets
y = [pooled text output, Fourier features of original (h, w), crop (top, left), target (h, w)]
per sample. A dropped caption is "" for the pooled output too (not zeros, as SDXL's training
drops it): the unconditional y is then exactly what the pipeline builds for an empty negative
prompt, the same rule the context follows. The sizes are never dropped.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import SIZE_EMBED_DIM, encode_prompt, sdxl_vector_cond
from ..datasets.shapes_text import caption_vocabulary
from ..diffusion.losses import diffusion_loss, draw_noise
from ..models.backbone import NAMES, Backbone, BackboneConfig, build, for_latents, kind_of, requires_unet
from ..models.clip_text import CLIPTextConfig, CLIPTextEncoder
from ..models.presets import get_preset
from ..models.tokenizer import CLIPTokenizer, SubVocabTokenizer
from ..models.unet import UNetConfig
from ..models.vae import PIXEL_SPACE, AutoencoderKL
from ..pipelines.images import make_grid, save_png
from ..pipelines.latent_model import LatentModelInfo, load_autoencoder, load_parts, save_text2image
from ..pipelines.precision import DTYPES
from ..pipelines.stable_diffusion import StableDiffusion
from ..pipelines.super_resolution import AUGMENTATION_DIM, augment, degrade
from .base import BaseTrainer
from .sections import SMALL_TEXT_ENCODER, Text2ImageOptions
from .typed import field_differences, with_overrides
from .data import BucketBatches, EpochBatches, make_captioned_data

GRID_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle and a purple square",
                "two orange triangles", "a red circle to the left of a blue square",
                "a green square above a yellow triangle", "")


def size_condition(pooled: Tensor, sizes: Tensor) -> Tensor:
    """SDXL's y (B, P + 6 * 256) for per-sample sizes (B, 6): original (h, w), crop (top, left),
    target (h, w) (``CaptionedBatch.sizes``)."""
    return sdxl_vector_cond(pooled, sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6])


def pooled_width(text_cfg: CLIPTextConfig) -> int:
    """Width of the text encoder's ``pooled_output``: its projection's, else its own."""
    return text_cfg.projection_dim or text_cfg.width


def size_condition_width(text_cfg: CLIPTextConfig) -> int:
    """The U-Net's ``adm_in_channels`` with size conditioning: the pooled output and 6 sizes."""
    return pooled_width(text_cfg) + 6 * SIZE_EMBED_DIM


class TextToImage(nn.Module):
    """The trained networks as one module (one DDP wrapper, one EMA): captions -> context (and,
    with per-sample ``sizes``, SDXL's vector y) -> U-Net. Captions are encoded by the pipeline's
    own ``conditioning.encode_prompt`` (family "sd1"), so training and inference read a prompt the
    same way (the same tokens, chunks of 75 and emphasis syntax)."""

    def __init__(self, unet: Backbone, text_encoder: CLIPTextEncoder, tokenizer: CLIPTokenizer):
        super().__init__()
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer

    def forward(self, x: Tensor, t: Tensor, captions: list[str], sizes: Tensor | None = None,
                low_res: Tensor | None = None, augmentation: Tensor | None = None) -> Tensor:
        """``low_res`` / ``augmentation``: a super-resolution model's noised low-resolution input
        (B, C, H, W) and the embedding of its noise level (B, 256), ``super_resolution.augment``."""
        c = encode_prompt("sd1", [self.text_encoder], self.tokenizer, captions, "", zero_empty_negative=True,
                          with_pooled=sizes is not None)
        y = None if sizes is None else size_condition(c.pooled, sizes)  # (B, P + 6 * 256)
        if low_res is not None:
            x, y = torch.cat([x, low_res.to(x.dtype)], dim=1), augmentation  # (B, 2C, H, W)
        return self.unet(x, t, c.context.to(x.dtype), y)  # context (B, 77 * chunks, width)


PIXEL = "pixel"  # text2image.vae_model for a pixel-space model (no autoencoder)


class TextToImageTrainer(BaseTrainer):
    options: Text2ImageOptions

    def build(self) -> None:
        c, o = self.config, self.options
        self.data = make_captioned_data(c.data, c.image_size, c.data_size, c.seed, c.center_crop,
                                        bucket_step=o.bucket_step if o.buckets else None, min_bucket=c.batch_size,
                                        shapes_config=c.shapes_config(), workers=c.data_workers)
        vae = AutoencoderKL(PIXEL_SPACE) if o.vae_model == PIXEL else load_autoencoder(o.vae_model)
        self.vae = vae.to(self.device).requires_grad_(False)
        # The vocabulary: every token the captions can hold (and the grid prompts'), in a fixed order.
        # For "shapes" that is its whole caption grammar, so a resumed run that draws other scenes
        # (shapes_options) keeps the vocabulary; for a folder, the tokens of its captions.
        texts = caption_vocabulary() if c.data == "shapes" else self.data.captions()
        self.tokenizer = SubVocabTokenizer.from_texts(CLIPTokenizer.from_bpe_file(), [*texts, *GRID_PROMPTS])
        text_cfg = o.text_encoder_config(self.tokenizer.vocab_size, self.tokenizer.eos_id)
        latent = self.vae.config.latent_channels
        f = self.vae.config.downsample_factor
        net_cfg = for_latents(get_preset(c.model), latent, text_cfg.width, c.image_size // f)
        if o.size_conditioning:
            requires_unet(net_cfg, "size_conditioning")
            net_cfg = replace(net_cfg, num_classes="sequential", adm_in_channels=size_condition_width(text_cfg))
        if o.low_res is not None:  # the noisy image and the noised low-resolution one; y: the noise level
            requires_unet(net_cfg, "A super-resolution model (text2image.low_res)")
            net_cfg = replace(net_cfg, in_channels=2 * latent, num_classes="sequential",
                              adm_in_channels=AUGMENTATION_DIM)
        net_cfg = with_overrides(net_cfg, c.model_overrides, "model_overrides")
        self._check_shapes(net_cfg, text_cfg)
        torch.manual_seed(c.seed)  # initial weights
        self.net = TextToImage(build(net_cfg), CLIPTextEncoder(text_cfg), self.tokenizer).to(self.device)
        self.net.text_encoder.requires_grad_(o.train_text_encoder)
        self.info = LatentModelInfo(c.image_size, c.schedule, c.num_timesteps, zero_terminal_snr=c.zero_terminal_snr,
                                    prediction=c.prediction, size_conditioning=o.size_conditioning,
                                    low_res=o.low_res)

    def _check_shapes(self, unet_cfg: BackboneConfig, text_cfg: CLIPTextConfig) -> None:
        o = self.options
        if kind_of(unet_cfg) == "dit":
            if o.buckets:
                raise ValueError("a DiT's position table is fixed to one latent size: aspect buckets need a U-Net "
                                 "(set text2image.buckets to false)")
            return
        width = size_condition_width(text_cfg)
        if o.size_conditioning and (unet_cfg.num_classes != "sequential" or unet_cfg.adm_in_channels != width):
            raise ValueError("size_conditioning sets the U-Net's num_classes to 'sequential' and adm_in_channels to "
                             f"{width}: leave both out of model_overrides")
        multiple = self.vae.config.downsample_factor * 2 ** (len(unet_cfg.channel_mult) - 1)
        if o.buckets and o.bucket_step % multiple:
            raise ValueError(f"bucket_step {o.bucket_step} must be a multiple of {multiple} (the autoencoder's factor "
                             f"{self.vae.config.downsample_factor} times the U-Net's downsampling "
                             f"{2 ** (len(unet_cfg.channel_mult) - 1)}), so that every bucket's latents halve evenly")

    def trainable(self) -> nn.Module:
        return self.net

    def extra_state(self) -> dict:
        return {"vocabulary": list(self.tokenizer.kept_ids)}

    def load_state_dict(self, state: dict) -> None:
        """As the base class, after checking that the run's vocabulary is this config's: the text
        encoder's embedding rows are the tokens of that vocabulary, in order."""
        saved = state.get("vocabulary")
        rows = state["model"]["text_encoder.embeddings.token_embedding.weight"].shape[0]
        if (saved is not None and tuple(saved) != self.tokenizer.kept_ids) or rows != self.tokenizer.vocab_size:
            words = {i: w for w, i in self.tokenizer.base.vocab.items()}
            what = ""
            if saved is not None:
                gone = [words[i] for i in sorted(set(saved) - set(self.tokenizer.kept_ids))]
                new = [words[i] for i in sorted(set(self.tokenizer.kept_ids) - set(saved))]
                what = f" (tokens only the run has: {gone[:10]}; only this config's captions: {new[:10]})"
            raise ValueError(f"cannot resume: the run's text encoder has a vocabulary of {rows - 1} tokens, this "
                             f"config's captions give {self.tokenizer.vocab_size - 1}{what}; resume with the data "
                             "the run was started with")
        super().load_state_dict(state)

    def load_weights(self, path: Path) -> list[str]:
        """Start from the weights of a saved model file (e.g. fine-tuning the embedded model): the
        U-Net and the text encoder, at the file's precision; the EMA starts equal to them; the
        optimizer, the LR schedule and the step start afresh. The file must have this config's
        architecture, vocabulary and autoencoder (the U-Net learnt that autoencoder's latents).
        Returns the differences of the model's settings (prediction, schedule...) for ``resumes.jsonl``."""
        unet, vae, text_encoder, tokenizer, info, _ = load_parts(path)
        if kind_of(unet) != kind_of(self.net.unet):
            raise ValueError(f"cannot start from {path}: its denoising network is a {NAMES[kind_of(unet)]}, this "
                             f"config's a {NAMES[kind_of(self.net.unet)]} (model {self.config.model!r})")
        architecture = lambda cfg: replace(cfg, gradient_checkpointing=False)  # noqa: E731  (how it trains)
        problems = [f"{name}: {', '.join(field_differences(asdict(theirs), asdict(ours)))}"
                    for name, theirs, ours in ((NAMES[kind_of(unet)], architecture(unet.config),
                                                architecture(self.net.unet.config)),
                                               ("text encoder", text_encoder.config, self.net.text_encoder.config),
                                               ("autoencoder", vae.config, self.vae.config))
                    if theirs != ours]
        if tokenizer.kept_ids != self.tokenizer.kept_ids:
            problems.append(f"vocabulary: the file's text encoder knows {tokenizer.vocab_size - 1} tokens, this "
                            f"config's captions give {self.tokenizer.vocab_size - 1}")
        if problems:
            raise ValueError(f"cannot start from {path}: it differs from this config in " + "; ".join(problems)
                             + " (match the config to the model it starts from: model, model_overrides, "
                             "text2image.text_encoder, text2image.vae_model, data)")
        self.net.unet.load_state_dict(unet.state_dict())
        self.net.text_encoder.load_state_dict(text_encoder.state_dict())
        self.ema.model.load_state_dict(self.net.state_dict())
        return field_differences(asdict(info), asdict(self.info))

    def make_batches(self) -> EpochBatches | BucketBatches:
        if self.data.bucket_of is None:
            return super().make_batches()
        return BucketBatches(self.data.bucket_of, self.config.batch_size, self.config.seed)

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        c, g, b = self.config, self.noise_gen, idx.numel()
        h, w = self.data.target_of(int(idx[0]))  # a batch is of one size (one bucket)
        f = self.vae.config.downsample_factor
        latent_shape = (b, self.vae.config.latent_channels, h // f, w // f)
        # Every draw is made for the global batch, in a fixed order, then sliced (distributed.py).
        drop = torch.rand(b, generator=g) < c.cond_dropout
        posterior_noise = torch.randn(latent_shape, generator=g)
        t, noise = draw_noise(latent_shape, self.schedule, self.loss_config, g)
        seeds = self.data.crop_seeds(b, g)  # random crops only
        mine = self.world.local_slice(b)
        batch = self.data.batch(idx[mine], None if seeds is None else seeds[mine])
        captions = ["" if d else text for d, text in zip(drop[mine].tolist(), batch.captions)]
        with torch.no_grad():
            z = self.vae.encode(batch.images.to(self.device))
            z = (z.mean + z.std * posterior_noise[mine].to(self.device)) * self.vae.config.scaling_factor
        sizes = {"sizes": batch.sizes.to(self.device)} if self.options.size_conditioning else {}  # (b, 6)
        if self.options.low_res is not None:  # drawn after the rest: other runs keep their random streams
            sizes.update(self._low_res_inputs(z, g, b, mine))
        return diffusion_loss(model, z, self.schedule, self.loss_config, t=t[mine], noise=noise[mine],
                              captions=captions, **sizes)

    def _low_res_inputs(self, images: Tensor, g: torch.Generator, b: int, mine: slice) -> dict[str, Tensor]:
        """A super-resolution model's inputs for its slice of the global batch: the images degraded
        to ``low_res`` and noised to levels s ~ U{0 .. augmentation_max * T - 1}."""
        o, shape = self.options, (b, *images.shape[1:])
        top = max(1, int(o.augmentation_max * self.schedule.num_timesteps))
        s = torch.randint(0, top, (b,), generator=g)
        noise = torch.randn(shape, generator=g)
        low, y = augment(degrade(images, o.low_res), s[mine].to(self.device), noise[mine].to(self.device),
                         self.schedule)
        return {"low_res": low, "augmentation": y}

    def ema_pipeline(self) -> StableDiffusion:
        net = self.ema.model
        return StableDiffusion(net.unet, self.vae, self.tokenizer, "sd1", text_encoder=net.text_encoder,
                               schedule=self.schedule, prediction=self.config.prediction,
                               native_size=self.config.image_size, size_conditioning=self.options.size_conditioning,
                               low_res=self.options.low_res)

    def save_model(self) -> None:
        net = self.ema.model
        c = self.config
        defaults = {"sampler": c.sample_sampler, "steps": c.sample_steps, "cfg_scale": c.sample_cfg_scale}
        save_text2image(self.model_path, net.unet, self.vae, net.text_encoder, self.tokenizer,
                        self.info, dtype=DTYPES[self.options.model_dtype],
                        extra={"train_config": c.to_dict(), "step": self.step, "defaults": defaults})

    def sample_grid(self) -> None:
        c = self.config
        pipe = self.ema_pipeline()
        if self.options.low_res is not None:
            return self._super_resolution_grid(pipe)
        images = pipe(list(GRID_PROMPTS), steps=c.sample_steps, sampler=c.sample_sampler, cfg_scale=c.sample_cfg_scale,
                      seed=0, batch_size=4, output="tensor")  # (8 * 4, 3, H, W), 4 seeds per prompt
        grid = make_grid(images.view(len(GRID_PROMPTS), 4, *images.shape[1:]).transpose(0, 1).flatten(0, 1),
                         nrow=len(GRID_PROMPTS), scale=2)
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}; columns: {' | '.join(GRID_PROMPTS[:-1])} | (empty); "
                 f"sampler {c.sample_sampler}, {c.sample_steps} steps, cfg {c.sample_cfg_scale}", overwrite=True)


    def _super_resolution_grid(self, pipe: StableDiffusion) -> None:
        """Rows: the first 8 training images, bicubic from low_res, the model's upsampling of that."""
        c, low_res = self.config, self.options.low_res
        batch = self.data.batch(torch.arange(min(8, len(self.data))), None)
        small = F.interpolate(batch.images, size=(low_res, low_res), mode="area")
        drawn = pipe(batch.captions, low_res_image=small, steps=c.sample_steps, sampler=c.sample_sampler,
                     cfg_scale=c.sample_cfg_scale, seed=0, output="tensor")
        grid = make_grid(torch.cat([batch.images, degrade(small, low_res, batch.images.shape[-2:]), drawn]),
                         nrow=len(drawn), scale=2)
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}; rows: the image | bicubic from {low_res} px | this model from {low_res} px; "
                 f"sampler {c.sample_sampler}, {c.sample_steps} steps, cfg {c.sample_cfg_scale}", overwrite=True)


__all__ = ["TextToImage", "TextToImageTrainer", "SMALL_TEXT_ENCODER", "GRID_PROMPTS", "UNetConfig", "size_condition"]
