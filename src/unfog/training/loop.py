"""`unfog train`: the training loop for pixel-space diffusion models.

AdamW with linear LR warm-up, gradient clipping, EMA of the weights, bf16 autocast, condition
dropout for classifier-free guidance, periodic sample grids, and atomic, resumable states.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..diffusion import DiscreteSchedule
from ..diffusion.losses import LossConfig, diffusion_loss
from ..models.presets import get_preset
from ..models.unet import UNet, UNetConfig
from ..pipelines.images import make_grid, save_png
from ..pipelines.pixel import PixelDiffusion, PixelModelInfo
from .config import TrainConfig, config_differences
from .data import EpochBatches, LabelledImages, make_data
from .ema import EMA
from .state import list_states, load_state, save_state


def unet_config(config: TrainConfig, data: LabelledImages, channels: int) -> UNetConfig:
    """The preset with the config's overrides; class-conditional data adds one null class."""
    classes = None if data.num_classes is None else data.num_classes + 1
    base = replace(get_preset(config.model), in_channels=channels, out_channels=channels, num_classes=classes)
    try:
        return replace(base, **config.model_overrides)
    except TypeError as err:
        raise ValueError(f"model_overrides: {err}; valid keys: {', '.join(UNetConfig.__dataclass_fields__)}") from None


def lr_factor(step: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class Trainer:
    def __init__(self, config: TrainConfig, device: str | None = None):
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        channels = 1 if config.data == "digits" else 3
        self.data = make_data(config.data, config.image_size, channels)
        torch.manual_seed(config.seed)  # initial weights and dropout
        self.model = UNet(unet_config(config, self.data, channels)).to(self.device)
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.batches = EpochBatches(len(self.data), config.batch_size, config.seed)
        self.noise_gen = torch.Generator().manual_seed(config.seed + 1)  # timesteps, noise, label dropout
        self.schedule = DiscreteSchedule.make(config.schedule, config.num_timesteps, zero_terminal_snr=config.zero_terminal_snr)
        self.loss_config = LossConfig(config.prediction, config.min_snr_gamma, config.offset_noise)
        self.info = PixelModelInfo(config.image_size, channels, config.schedule, config.num_timesteps,
                                   config.zero_terminal_snr, config.prediction, self.data.num_classes,
                                   tuple(str(k) for k in range(self.data.num_classes)) if self.data.num_classes else None)
        self.step = 0
        self.out = Path(config.out_dir)

    # ---- one optimisation step ------------------------------------------------------------------
    def train_step(self) -> float:
        x0, y = self.data.batch(self.batches.next())
        kwargs = {}
        if y is not None:
            drop = torch.rand(y.shape[0], generator=self.noise_gen) < self.config.cond_dropout
            kwargs["y"] = torch.where(drop, self.data.num_classes, y).to(self.device)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            loss = diffusion_loss(self.model, x0.to(self.device), self.schedule, self.loss_config,
                                  generator=self.noise_gen, **kwargs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.lr_sched.step()
        self.ema.update(self.model)
        self.step += 1
        return loss.item()

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "config": self.config.to_dict(), "model": self.model.state_dict(),
            "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_sched": self.lr_sched.state_dict(), "batches": self.batches.state_dict(),
            "noise_gen": self.noise_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.batches.load_state_dict(state["batches"])
        self.noise_gen.set_state(state["noise_gen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self) -> None:
        save_state(self.out / "states", self.step, self.state_dict(), self.config.keep_last)
        self.ema_pipeline().save(self.out / "model.safetensors",
                                 extra={"train_config": self.config.to_dict(), "step": self.step})

    def ema_pipeline(self) -> PixelDiffusion:
        return PixelDiffusion(self.ema.model, self.info)

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


def _resume(trainer: Trainer, force: bool) -> None:
    states = list_states(trainer.out / "states")
    if not states:
        raise FileNotFoundError(f"nothing to resume: no training state in {trainer.out / 'states'}")
    state = load_state(states[-1])
    diffs = config_differences(state["config"], trainer.config.to_dict())
    if diffs and not force:
        raise ValueError("the config differs from the one the run was started with: " + "; ".join(diffs)
                         + " (pass --force to resume anyway)")
    trainer.load_state_dict(state)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
          progress: bool = True, device: str | None = None) -> Path:
    """Train (or resume) the run of ``config``; returns the path of the final model file."""
    out = Path(config.out_dir)
    if list_states(out / "states") and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it "
                              "or --overwrite to start again")
    trainer = Trainer(config, device)
    if resume:
        _resume(trainer, force)
    elif overwrite:
        for old in list_states(out / "states"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    log = (out / "log.jsonl").open("a")
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not progress, desc="train", unit="it")
    smooth, t0 = None, time.perf_counter()
    try:
        while trainer.step < config.steps:
            loss = trainer.train_step()
            smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{trainer.lr_sched.get_last_lr()[0]:.2e}")
            if trainer.step % config.log_every == 0:
                log.write(json.dumps({"step": trainer.step, "loss": loss, "loss_smooth": smooth,
                                      "lr": trainer.lr_sched.get_last_lr()[0],
                                      "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")
                log.flush()
            last = trainer.step == config.steps
            if trainer.step % config.save_every == 0 or last:
                trainer.save()
            if trainer.step % config.sample_every == 0 or last:
                trainer.sample_grid()
    except KeyboardInterrupt:
        trainer.save()
        bar.close()
        print(f"\ninterrupted: state saved at step {trainer.step} in {out / 'states'}; resume with --resume")
        raise
    finally:
        bar.close()
        log.close()
    return out / "model.safetensors"
