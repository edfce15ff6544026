"""The trainer of pixel-space diffusion models: a U-Net on the images themselves, class-conditional
on digits (with a null class for classifier-free guidance) or unconditional on an image folder."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..diffusion.losses import diffusion_loss, draw_noise
from ..models.backbone import requires_unet
from ..models.presets import get_preset
from ..models.unet import UNet, UNetConfig
from ..pipelines.images import make_grid, save_png
from ..pipelines.pixel import PixelDiffusion, PixelModelInfo
from .base import BaseTrainer
from .config import TrainConfig
from .typed import with_overrides
from .data import LabelledImages, make_data


def unet_config(config: TrainConfig, data: LabelledImages, channels: int) -> UNetConfig:
    """The preset with the config's overrides; class-conditional data adds one null class."""
    classes = None if data.num_classes is None else data.num_classes + 1
    requires_unet(get_preset(config.model), "Task 'pixel'")
    base = replace(get_preset(config.model), in_channels=channels, out_channels=channels, num_classes=classes)
    return with_overrides(base, config.model_overrides, "model_overrides")


class PixelTrainer(BaseTrainer):
    """A pixel-space U-Net: class-conditional on digits (with a null class for CFG), or
    unconditional on an image folder."""

    def build(self) -> None:
        config = self.config
        channels = 1 if config.data == "digits" else 3
        self.data = make_data(config.data, config.image_size, channels)
        torch.manual_seed(config.seed)  # initial weights and dropout
        self.unet = UNet(unet_config(config, self.data, channels)).to(self.device)
        self.info = PixelModelInfo(config.image_size, channels, config.schedule, config.num_timesteps,
                                   config.zero_terminal_snr, config.prediction, self.data.num_classes,
                                   tuple(str(k) for k in range(self.data.num_classes)) if self.data.num_classes else None)

    def trainable(self) -> nn.Module:
        return self.unet

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        g, b, mine = self.noise_gen, idx.numel(), self.world.local_slice(idx.numel())
        x0, y = self.data.batch(idx[mine])
        kwargs = {}
        if y is not None:  # label dropout: the null class trains the unconditional model
            drop = torch.rand(b, generator=g)[mine] < self.config.cond_dropout
            kwargs["y"] = torch.where(drop, self.data.num_classes, y).to(self.device)
        t, noise = draw_noise((b, *x0.shape[1:]), self.schedule, self.loss_config, g)
        return diffusion_loss(model, x0.to(self.device), self.schedule, self.loss_config,
                              t=t[mine], noise=noise[mine], **kwargs)

    def save_model(self) -> None:
        self.ema_pipeline().save(self.model_path,
                                 extra={"train_config": self.config.to_dict(), "step": self.step})

    def ema_pipeline(self) -> PixelDiffusion:
        """The EMA model, recommending the config's sampling settings (written to the model file)."""
        c = self.config
        return PixelDiffusion(self.ema.model, self.info,
                              {"sampler": c.sample_sampler, "steps": c.sample_steps, "cfg_scale": c.sample_cfg_scale})

    def sample_grid(self) -> None:
        pipe = self.ema_pipeline()
        c = self.config
        if self.info.num_classes:
            labels = torch.arange(self.info.num_classes).repeat_interleave(8)
            images = pipe.generate(labels, sampler=c.sample_sampler, steps=c.sample_steps, cfg_scale=c.sample_cfg_scale)
            grid = make_grid(images.view(self.info.num_classes, 8, *images.shape[1:]).transpose(0, 1).flatten(0, 1),
                             nrow=self.info.num_classes, scale=2)
        else:
            images = pipe.generate(num_images=64, sampler=c.sample_sampler, steps=c.sample_steps)
            grid = make_grid(images, nrow=8, scale=2)
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}, sampler {c.sample_sampler}, {c.sample_steps} steps, cfg {c.sample_cfg_scale}",
                 overwrite=True)
