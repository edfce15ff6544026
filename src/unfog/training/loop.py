"""`unfog train`: the training loop, and the trainer of pixel-space diffusion models.

AdamW with linear LR warm-up, gradient clipping, EMA of the weights, bf16 autocast, condition
dropout for classifier-free guidance, periodic sample grids, and atomic, resumable states.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoint.io import atomic_write
from ..diffusion.losses import diffusion_loss, draw_noise
from ..models.presets import get_preset
from ..models.unet import UNet, UNetConfig
from ..pipelines.images import make_grid, save_png
from ..pipelines.pixel import PixelDiffusion, PixelModelInfo
from .config import TrainConfig, config_differences, with_overrides
from .base import BaseTrainer
from .data import LabelledImages, make_data
from .state import list_states, load_state


def unet_config(config: TrainConfig, data: LabelledImages, channels: int) -> UNetConfig:
    """The preset with the config's overrides; class-conditional data adds one null class."""
    classes = None if data.num_classes is None else data.num_classes + 1
    base = replace(get_preset(config.model), in_channels=channels, out_channels=channels, num_classes=classes)
    return with_overrides(base, config.model_overrides, "model_overrides")


class Trainer(BaseTrainer):
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


def make_trainer(config: TrainConfig, device: str | None = None) -> BaseTrainer:
    """The trainer of the config's task."""
    if config.task == "autoencoder":
        from .autoencoder import AutoencoderTrainer

        return AutoencoderTrainer(config, device)
    if config.task == "text2image":
        from .text2image import TextToImageTrainer

        return TextToImageTrainer(config, device)
    return Trainer(config, device)


def _resume(trainer: BaseTrainer, force: bool) -> list[str]:
    """Load the latest state; returns every config change against it (cadence included), which
    ``train`` records in ``resumes.jsonl``. A change of the trajectory needs ``force``."""
    states = list_states(trainer.out / "states")
    if not states:
        raise FileNotFoundError(f"nothing to resume: no training state in {trainer.out / 'states'}")
    state = load_state(states[-1])
    diffs = config_differences(state["config"], trainer.config.to_dict())
    if diffs and not force:
        raise ValueError("the config differs from the one the run was started with: " + "; ".join(diffs)
                         + " (pass --force to resume anyway)")
    if diffs and trainer.world.is_main:
        print("resuming with a changed config (--force): " + "; ".join(diffs), file=sys.stderr)
    trainer.load_state_dict(state)
    return config_differences(state["config"], trainer.config.to_dict(), ignore=())


def find_state(source: Path) -> Path:
    """The training state ``source`` names: a state file (or a model file), or the latest state of a
    run folder (its ``states`` folder or the folder itself)."""
    source = Path(source)
    if source.is_file():
        return source
    for folder in (source / "states", source):
        states = list_states(folder)
        if states:
            return states[-1]
    raise FileNotFoundError(f"no training state to start from in {source}: expected a state_XXXXXXXX.pt file, "
                            "a run folder holding them in states/, or a model .safetensors file")


def _init_from(trainer: BaseTrainer, path: Path) -> list[str]:
    """Start a new run from another run's state file ``path`` (weights, EMA, optimizer, RNG
    streams, step): a curriculum stage. Every config difference is expected there, so none needs
    ``force``; they are returned for ``resumes.jsonl``, after the state they came from. A model
    file (``.safetensors``) gives the weights alone, and the run starts at step 0."""
    if path.suffix == ".safetensors":
        changes = trainer.load_weights(path)
        if trainer.world.is_main:
            print(f"starting from the weights of {path} (step 0, a fresh optimizer)", file=sys.stderr)
        return [f"started from the weights of {path}"] + changes
    state = load_state(path)
    trainer.load_state_dict(state)
    if trainer.world.is_main:
        print(f"starting from {path} (step {trainer.step})", file=sys.stderr)
    return [f"started from {path}"] + config_differences(state["config"], trainer.config.to_dict(), ignore=())


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines after ``step``: a killed run logs past its last saved state, and the
    resumed run logs those steps again. Rewritten atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) < len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


class _StopRequests:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers, ``kill`` and torchrun send) ask the loop to
    stop at the end of the current step, so the saved state is never that of a half-done step; a
    second Ctrl-C stops at once (the last saved state is intact: states are written atomically)."""

    def __init__(self):
        self.requested: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving the state "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False,
          init_from: str | Path | None = None, progress: bool = True, device: str | None = None) -> Path:
    """Train (or resume) the run of ``config``; returns the path of the final model file.
    ``init_from`` (a state file or run folder) starts the run from another run's state, e.g. the
    previous stage of a curriculum. Under torchrun every process calls this; rank 0 alone writes
    files and shows progress."""
    out = Path(config.out_dir)
    if resume and init_from is not None:
        raise ValueError("--resume continues the run in out_dir and --init-from starts a new one from another "
                         "run's state: pass one of them")
    if list_states(out / "states") and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it "
                              "or --overwrite to start again")
    if init_from is not None:
        source = find_state(init_from)  # before anything is built or deleted: a wrong path costs nothing
        if source.resolve().parent in ((out / "states").resolve(), out.resolve()):
            raise ValueError(f"--init-from {init_from} is this run's own state; use --resume to continue it")
    trainer = make_trainer(config, device)
    main = trainer.world.is_main
    changes = None
    if resume:
        changes = _resume(trainer, force)
    elif overwrite and main:
        for old in list_states(out / "states"):
            old.unlink()
        if (out / "log.jsonl").exists():
            (out / "log.jsonl").unlink()
    if init_from is not None:
        changes = _init_from(trainer, source)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / "log.jsonl", trainer.step)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        if changes:  # config.json now holds the new config; keep the history of what changed when
            with (out / "resumes.jsonl").open("a") as history:
                history.write(json.dumps({"step": trainer.step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          "changes": changes}) + "\n")
    log = (out / "log.jsonl").open("a") if main else None
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not (progress and main), desc="train", unit="it")
    smooth, t0 = None, time.perf_counter()
    try:
        with _StopRequests() as stop:
            while trainer.step < config.steps:
                loss = trainer.train_step()
                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{trainer.lr_sched.get_last_lr()[0]:.2e}")
                if log is not None and trainer.step % config.log_every == 0:
                    log.write(json.dumps({"step": trainer.step, "loss": loss, "loss_smooth": smooth,
                                          "lr": trainer.lr_sched.get_last_lr()[0],
                                          "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")
                    log.flush()
                last = trainer.step == config.steps
                stopping = trainer.world.any(stop.requested is not None)
                if trainer.step % config.save_every == 0 or last or stopping:
                    trainer.save()
                if main and (trainer.step % config.sample_every == 0 or last):
                    trainer.sample_grid()
                if stopping and not last:
                    if main:
                        bar.close()
                        print(f"interrupted: state saved at step {trainer.step} in {out / 'states'}; "
                              "resume with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
    finally:
        bar.close()
        if log is not None:
            log.close()
    return out / "model.safetensors"
