"""Stage 1 of a latent diffusion model: the KL autoencoder (Rombach et al. 2022, sec. 3.1 and
appendix G), trained as LDM's ``LPIPSWithDiscriminator`` does, without the parts that need
downloaded networks:

    loss = sum |x - D(z)| / B  (+ perceptual_weight * perceptual(x, D(z)))
         + kl_weight * sum KL(q(z|x) || N(0, I)) / B
         (+ disc_weight * hinge generator loss of a patch discriminator, from step disc_start)

with z = mean + std * n a posterior sample. Sums run over pixels and latent elements and are
divided by the batch size, so ``kl_weight`` means what it means in LDM's configs (1e-6).
``perceptual`` is a hook: any callable (x, x_rec) -> (B,) distance, e.g. LPIPS when the user
has it. The patch discriminator (Isola et al. 2017) is ours, small, and off by default.

The latents' scaling factor is measured from data (1 / std of scaled-to-be latents over a fixed
sample of the training set, as LDM's ``scale_by_std``) and stored in the model's config, so the
diffusion stage sees latents of about unit variance.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vae import AutoencoderKL, DiagonalGaussian
from ..pipelines.images import make_grid, save_png
from ..pipelines.latent_model import load_autoencoder, save_autoencoder
from .base import BaseTrainer
from .sections import AutoencoderOptions
from .typed import field_differences
from .data import make_captioned_data

Perceptual = Callable[[Tensor, Tensor], Tensor]
SCALE_SAMPLE = 512  # images used to measure the latents' std


def kl_to_standard_normal(posterior: DiagonalGaussian) -> Tensor:
    """KL(N(mean, var) || N(0, I)) summed over the latent elements: (B,)."""
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)
    return kl.flatten(1).sum(1)


def autoencoder_loss(x: Tensor, rec: Tensor, posterior: DiagonalGaussian, kl_weight: float,
                     perceptual: Perceptual | None = None, perceptual_weight: float = 1.0) -> Tensor:
    """LDM's reconstruction + KL objective (no discriminator term), a scalar."""
    per_sample = (x.float() - rec.float()).abs().flatten(1).sum(1)  # (B,)
    if perceptual is not None:
        per_sample = per_sample + perceptual_weight * perceptual(x, rec).float() * x[0].numel()
    return per_sample.mean() + kl_weight * kl_to_standard_normal(posterior).float().mean()


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided 4x4 convs with GroupNorm and LeakyReLU -> a map of real/fake logits."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.GroupNorm(32, 2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        blocks.append(nn.Conv2d(ch, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, H / 2**layers, W / 2**layers)


class Reconstruction(nn.Module):
    """The trained module (one DDP wrapper, one EMA): images and posterior noise -> reconstruction
    and the posterior's moments."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        posterior = self.vae.encode(x)
        rec = self.vae.decode(posterior.mean + posterior.std * noise)  # (B, C, H, W)
        return rec, posterior.mean, posterior.logvar


class AutoencoderTrainer(BaseTrainer):
    options: AutoencoderOptions
    perceptual: Perceptual | None = None  # set before training to add a perceptual loss

    def build(self) -> None:
        c, o = self.config, self.options
        self.data = make_captioned_data(c.data, c.image_size, c.data_size, c.seed, c.center_crop, need_captions=False,
                                        shapes_config=c.shapes_config(), workers=c.data_workers)
        vae_cfg = o.vae_config()
        if c.image_size % vae_cfg.downsample_factor:
            raise ValueError(f"image_size {c.image_size} is not a multiple of the autoencoder's downsampling "
                             f"factor {vae_cfg.downsample_factor}")
        torch.manual_seed(c.seed)
        self.net = Reconstruction(AutoencoderKL(vae_cfg)).to(self.device)
        self.kept_scaling: float | None = None  # train_encoder false: the scaling factor of --init-from's model
        if not o.train_encoder:
            for module in (self.net.vae.encoder, self.net.vae.quant_conv):
                module.requires_grad_(False)
        self.disc = None
        if o.disc_weight > 0:
            if self.world.distributed:
                raise ValueError("the patch discriminator (disc_weight > 0) is not supported under torchrun yet")
            self.disc = PatchDiscriminator().to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=c.lr, betas=(0.5, 0.9))

    def trainable(self) -> nn.Module:
        return self.net

    def load_weights(self, path: Path) -> list[str]:
        """Start from the autoencoder of a model file (``--init-from``): an autoencoder, or a
        text-to-image model's; its architecture must be this config's. The EMA starts equal to it."""
        vae = load_autoencoder(path)
        differences = field_differences(asdict(vae.config), asdict(self.net.vae.config), ignore=("scaling_factor",))
        if differences:
            raise ValueError(f"cannot start from {path}: its autoencoder differs from this config's in "
                             f"{', '.join(differences)} (set autoencoder.vae_overrides to the model's)")
        self.net.vae.load_state_dict(vae.state_dict())
        self.ema.model.load_state_dict(self.net.state_dict())
        self.kept_scaling = vae.config.scaling_factor
        return []

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        c, o, b, mine = self.config, self.options, idx.numel(), self.world.local_slice(idx.numel())
        if not o.train_encoder and self.kept_scaling is None:
            raise ValueError("autoencoder.train_encoder false fine-tunes the decoder of an existing autoencoder: "
                             "give it with --init-from MODEL.safetensors (an autoencoder or a text-to-image model)")
        vae_cfg = self.net.vae.config
        side = c.image_size // vae_cfg.downsample_factor
        posterior_noise = torch.randn((b, vae_cfg.latent_channels, side, side), generator=self.noise_gen)
        seeds = self.data.crop_seeds(b, self.noise_gen)  # random crops only
        x = self.data.batch(idx[mine], None if seeds is None else seeds[mine]).images
        x = x.to(self.device)
        rec, mean, logvar = model(x, posterior_noise[mine].to(self.device))
        loss = autoencoder_loss(x, rec, DiagonalGaussian(torch.cat([mean, logvar], 1)), o.kl_weight, self.perceptual)
        if self.disc is not None and self.step >= o.disc_start:
            self._disc_step(x, rec.detach())  # first, so the generator term below sees the updated critic
            loss = loss + o.disc_weight * -self.disc(rec).mean()  # hinge generator loss
        return loss

    def _disc_step(self, real: Tensor, fake: Tensor) -> None:
        """One hinge-loss step of the discriminator (Lim & Ye 2017)."""
        loss = F.relu(1 - self.disc(real)).mean() + F.relu(1 + self.disc(fake)).mean()
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()

    def extra_state(self) -> dict:
        extra = {} if self.kept_scaling is None else {"kept_scaling": self.kept_scaling}
        if self.disc is not None:
            extra |= {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}
        return extra

    def load_extra_state(self, state: dict) -> None:
        self.kept_scaling = state.get("kept_scaling")
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    def _fixed_images(self, idx: Tensor) -> Tensor:
        """Images ``idx`` with crops from fixed seeds: measuring and showing the model draws from
        no training generator (a resumed run stays exact)."""
        g = torch.Generator().manual_seed(0)
        return self.data.batch(idx, self.data.crop_seeds(idx.numel(), g)).images

    @torch.no_grad()
    def scaling_factor(self, vae: AutoencoderKL) -> float:
        """1 / std of posterior samples over a fixed sample of the data (LDM's ``scale_by_std``)."""
        n = min(SCALE_SAMPLE, len(self.data))
        idx = torch.linspace(0, len(self.data) - 1, n).long()
        g = torch.Generator().manual_seed(0)
        latents = [vae.encode(self._fixed_images(chunk).to(self.device)).sample(g) for chunk in idx.split(64)]
        return 1.0 / torch.cat(latents).float().std().item()

    def save_model(self) -> None:
        vae = self.ema.model.vae
        kept = self.kept_scaling if not self.options.train_encoder else None
        vae.config = replace(vae.config, scaling_factor=kept or self.scaling_factor(vae))
        save_autoencoder(self.model_path, vae,
                         extra={"train_config": self.config.to_dict(), "step": self.step})

    @torch.no_grad()
    def sample_grid(self) -> None:
        """Top row: 8 training images; bottom row: the EMA autoencoder's reconstructions (means)."""
        x = self._fixed_images(torch.arange(min(8, len(self.data))))
        vae = self.ema.model.vae
        rec = vae.decode(vae.encode(x.to(self.device)).mode()).clamp(-1, 1).cpu()
        grid = make_grid(torch.cat([x, rec]), nrow=x.shape[0], scale=2)
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}: training images (top) and their reconstructions (bottom)", overwrite=True)
