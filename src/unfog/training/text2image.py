"""Stage 2 of a latent diffusion model (Rombach et al. 2022, sec. 3.3): a U-Net with
cross-attention learns to denoise the latents of a trained, frozen autoencoder, conditioned on
a CLIP-style text transformer that trains with it (the LDM paper's text-to-image model trained
its BERT-like encoder jointly) or stays frozen.

Each step: the global batch's captions are dropped to "" with probability ``cond_dropout``
(so the same network is the unconditional model that classifier-free guidance needs), the
images are encoded to latents z = scaling_factor * (mean + std * n), and the usual diffusion
loss is taken on z. The tokenizer is CLIP's BPE restricted to the tokens of the training
captions (``SubVocabTokenizer``), and the prompt is encoded exactly as the "sd1" pipeline
encodes it at inference (77 tokens, padded with end-of-text, last layer normed).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..diffusion.losses import diffusion_loss, draw_noise
from ..models.clip_text import CLIPTextConfig, CLIPTextEncoder
from ..models.presets import get_preset
from ..models.tokenizer import CLIPTokenizer, SubVocabTokenizer
from ..models.unet import UNet, UNetConfig
from ..pipelines.images import make_grid, save_png
from ..pipelines.latent_model import LatentModelInfo, load_autoencoder, save_text2image
from ..pipelines.stable_diffusion import StableDiffusion
from .base import BaseTrainer
from .config import TrainConfig
from .data import make_captioned_data

MODEL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The small text transformer of the models we train (the vocabulary size comes from the data).
SMALL_TEXT_ENCODER = CLIPTextConfig(width=128, layers=3, heads=4, activation="gelu")
GRID_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle and a purple square",
                "two orange triangles", "a red circle to the left of a blue square",
                "a green square above a yellow triangle", "")


class TextToImage(nn.Module):
    """The trained networks as one module (one DDP wrapper, one EMA): ids -> context -> U-Net."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        context = self.text_encoder(input_ids).last_hidden_state  # (B, 77, width)
        return self.unet(x, t, context.to(x.dtype))


class TextToImageTrainer(BaseTrainer):
    def build(self) -> None:
        c = self.config
        self.data = make_captioned_data(c.data, c.image_size, c.data_size, c.seed, c.center_crop)
        self.vae = load_autoencoder(c.vae_model).to(self.device).requires_grad_(False)
        # The vocabulary: every token of the captions (and of the grid prompts), in a fixed order.
        self.tokenizer = SubVocabTokenizer.from_texts(CLIPTokenizer.from_bpe_file(),
                                                      [*self.data.captions(), *GRID_PROMPTS])
        text_cfg = replace(SMALL_TEXT_ENCODER, vocab_size=self.tokenizer.vocab_size, eos_token_id=self.tokenizer.eos_id)
        text_cfg = _override(text_cfg, c.text_encoder, "text_encoder")
        latent = self.vae.config.latent_channels
        unet_cfg = replace(get_preset(c.model), in_channels=latent, out_channels=latent, context_dim=text_cfg.width)
        unet_cfg = _override(unet_cfg, c.model_overrides, "model_overrides")
        torch.manual_seed(c.seed)  # initial weights
        self.net = TextToImage(UNet(unet_cfg), CLIPTextEncoder(text_cfg)).to(self.device)
        self.net.text_encoder.requires_grad_(c.train_text_encoder)
        self.info = LatentModelInfo(c.image_size, c.schedule, c.num_timesteps, zero_terminal_snr=c.zero_terminal_snr,
                                    prediction=c.prediction)
        self.latent_side = c.image_size // self.vae.config.downsample_factor

    def trainable(self) -> nn.Module:
        return self.net

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        c, g, b = self.config, self.noise_gen, idx.numel()
        latent_shape = (b, self.vae.config.latent_channels, self.latent_side, self.latent_side)
        # Every draw is made for the global batch, in a fixed order, then sliced (distributed.py).
        drop = torch.rand(b, generator=g) < c.cond_dropout
        posterior_noise = torch.randn(latent_shape, generator=g)
        t, noise = draw_noise(latent_shape, self.schedule, self.loss_config, g)
        mine = self.world.local_slice(b)
        images, captions = self.data.batch(idx[mine])
        captions = ["" if d else text for d, text in zip(drop[mine].tolist(), captions)]
        with torch.no_grad():
            z = self.vae.encode(images.to(self.device))
            z = (z.mean + z.std * posterior_noise[mine].to(self.device)) * self.vae.config.scaling_factor
        ids = self.tokenizer(captions, pad="eos").input_ids.to(self.device)  # (b, 77)
        return diffusion_loss(model, z, self.schedule, self.loss_config, t=t[mine], noise=noise[mine], input_ids=ids)

    def ema_pipeline(self) -> StableDiffusion:
        net = self.ema.model
        return StableDiffusion(net.unet, self.vae, self.tokenizer, "sd1", text_encoder=net.text_encoder,
                               schedule=self.schedule, prediction=self.config.prediction,
                               native_size=self.config.image_size)

    def save_model(self) -> None:
        net = self.ema.model
        save_text2image(self.out / "model.safetensors", net.unet, self.vae, net.text_encoder, self.tokenizer,
                        self.info, dtype=MODEL_DTYPES[self.config.model_dtype], extra={"train_config": self.config.to_dict(), "step": self.step,
                                          "defaults": {"sampler": self.config.sample_sampler,
                                                       "steps": self.config.sample_steps,
                                                       "cfg_scale": self.config.sample_cfg_scale}})

    def sample_grid(self) -> None:
        c = self.config
        pipe = self.ema_pipeline()
        images = pipe(list(GRID_PROMPTS), steps=c.sample_steps, sampler=c.sample_sampler, cfg_scale=c.sample_cfg_scale,
                      seed=0, batch_size=4, output="tensor")  # (8 * 4, 3, H, W), 4 seeds per prompt
        grid = make_grid(images.view(len(GRID_PROMPTS), 4, *images.shape[1:]).transpose(0, 1).flatten(0, 1),
                         nrow=len(GRID_PROMPTS), scale=2)
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}; columns: {' | '.join(GRID_PROMPTS[:-1])} | (empty); "
                 f"sampler {c.sample_sampler}, {c.sample_steps} steps, cfg {c.sample_cfg_scale}", overwrite=True)


def _override(cfg, changes: dict, what: str):
    try:
        return replace(cfg, **changes)
    except TypeError as err:
        raise ValueError(f"{what}: {err}; valid keys: {', '.join(type(cfg).__dataclass_fields__)}") from None


__all__ = ["TextToImage", "TextToImageTrainer", "SMALL_TEXT_ENCODER", "GRID_PROMPTS", "UNetConfig"]
