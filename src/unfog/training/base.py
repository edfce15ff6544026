"""What every trainer shares: the optimiser and LR schedule, EMA, the resumable batch order and
noise generator, bf16 autocast, gradient clipping, distributed slicing, and the training state.

A task (pixel U-Net, autoencoder, text-to-image; ``config.TASKS``) subclasses ``BaseTrainer``, reads
its own settings from ``self.options`` (the config's section of the task), and fills in
``build`` (data and networks), ``trainable`` (the module the optimiser, DDP and EMA see),
``compute_loss`` (the loss of this rank's slice of a global batch of indices), ``save_model``
and ``sample_grid``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..diffusion import DiscreteSchedule
from ..pipelines.precision import training_autocast
from .config import TrainConfig, get_task
from .sections import TaskOptions
from .data import BucketBatches, EpochBatches
from .distributed import World, init_world, training_device
from .ema import EMA
from .state import save_state


def lr_factor(step: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class BaseTrainer:
    def __init__(self, config: TrainConfig, device: str | None = None):
        trainer = get_task(config.task).load_trainer()
        if not isinstance(self, trainer):
            raise ValueError(f"{type(self).__name__} cannot train task {config.task!r}, whose trainer is "
                             f"{trainer.__name__} (make_trainer picks it)")
        self.config = config
        self.options: TaskOptions = config.options
        self.device = training_device(device)
        self.bf16_autocast = training_autocast(config.precision, self.device)  # "auto" decided on this machine
        self.world: World = init_world(self.device)
        self.schedule = DiscreteSchedule.make(config.schedule, config.num_timesteps,
                                              zero_terminal_snr=config.zero_terminal_snr)
        self.loss_config = config.loss_config()
        self.build()
        model = self.trainable()
        self.ema = EMA(model, config.ema_decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.model = self.world.wrap(model, self.device)  # DDP when torchrun started several processes
        self.batches = self.make_batches()
        self.noise_gen = torch.Generator().manual_seed(config.seed + 1)  # every draw of the training steps
        self.step = 0
        self.out = Path(config.out_dir)

    # ---- the task's parts ---------------------------------------------------------------------------
    def build(self) -> None:
        """Set ``self.data`` (len(), batch(idx)) and the networks."""
        raise NotImplementedError

    def trainable(self) -> nn.Module:
        raise NotImplementedError

    def make_batches(self) -> EpochBatches | BucketBatches:
        """The global batches of indices, in a resumable order (``next``, ``state_dict``)."""
        return EpochBatches(len(self.data), self.config.batch_size, self.config.seed)

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        raise NotImplementedError

    @property
    def model_path(self) -> Path:
        """The file ``save_model`` writes."""
        return self.out / "model.safetensors"

    def save_model(self) -> None:
        raise NotImplementedError

    def sample_grid(self) -> None:
        raise NotImplementedError

    # ---- one optimisation step ----------------------------------------------------------------------
    def train_step(self) -> float:
        """One step on the next global batch; returns its mean loss (averaged over the ranks)."""
        idx = self.batches.next()  # (batch_size,) the same on every rank
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast):
            loss = self.compute_loss(idx, self.model)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.lr_sched.step()
        self.ema.update(self.trainable())
        self.step += 1
        return self.world.mean(loss.item())

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "config": self.config.to_dict(), "model": self.trainable().state_dict(),
            "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_sched": self.lr_sched.state_dict(), "batches": self.batches.state_dict(),
            "noise_gen": self.noise_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.trainable().load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        # The saved scheduler holds the learning rate the run started with; the config's wins, so
        # that a forced resume with another lr, lr_schedule or steps uses them from its first step.
        self.lr_sched.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor(self.lr_sched.last_epoch, self.config)
        self.lr_sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.batches.load_state_dict(state["batches"])
        self.noise_gen.set_state(state["noise_gen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.load_extra_state(state)

    def weights_file(self, path: Path) -> bool:
        """Whether ``--init-from path`` names a model file (``load_weights``) rather than a training
        state; ``.safetensors`` files always are."""
        return False

    def load_weights(self, path: Path) -> list[str]:
        """Start from the weights of a saved model file (``--init-from model.safetensors``)."""
        raise ValueError(f"--init-from a model file ({path}) is supported for text2image and autoencoder runs, "
                         f"lora runs (a LoRA file), textual_inversion runs (an embedding), hypernetwork runs (a hypernetwork) and "
                         f"controlnet runs (a ControlNet); for a {self.config.task} run give a training state (a "
                         f"state_*.pt file or a run folder)")

    def extra_state(self) -> dict:
        """More state a task keeps (e.g. a discriminator and its optimiser)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def save(self) -> None:
        """The training state and the (EMA) model file; only rank 0 writes."""
        if self.world.is_main:
            save_state(self.out / "states", self.step, self.state_dict(), self.config.keep_last)
            self.save_model()
        self.world.barrier()
