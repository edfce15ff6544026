"""What the fine-tuning tasks share ("lora", "textual_inversion", "hypernetwork", "controlnet"): a trained part on a frozen
model that unfog loads, an official SD 1.x / 2.x / SDXL single file or diffusers folder, or an
unfog text-to-image file (the embedded "shapes" model by default).

The model loads through ``StableDiffusion.load``, so every format the pipelines read works, and
the training uses that pipeline's own pieces: its noise schedule and prediction type (a config
that sets ``schedule``, ``num_timesteps``, ``zero_terminal_snr`` or ``prediction`` to something
else is refused), and its prompt encoding (``conditioning.encode_prompt``: one conditioner for
training and inference; SDXL's vector y from the pooled output and each image's sizes). The data
(kohya's folder conventions, the latent cache) is ``lora_data``'s; the loss is drawn on the frozen
VAE's posterior.

A task fills in ``make_network`` (the module the optimiser, EMA and DDP see: the trained tensors
alone, whose forward runs the frozen model with them, e.g. through ``frozen_forward``),
``prompt_draws`` / ``make_prompts`` (a batch's captions -> its prompts), ``applied`` (the EMA's
trained part in the pipeline while the sample grid draws), ``describe``, ``model_path`` /
``output_paths`` and ``save_model``; ``make_data`` and ``extra_inputs`` where its data carry
more than captioned images (ControlNet's hints). Its options section has the fields ``base_model``,
``base_dtype``, ``cache_latents`` and ``validation_prompts``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.io import sha256_from
from ..conditioning import encode_prompt, sdxl_vector_cond
from ..diffusion.losses import diffusion_loss, draw_noise
from ..diffusion.schedules import DiscreteSchedule
from ..embedded import DEFAULT_TEXT_MODEL, default_model_path
from ..models.backbone import requires_unet
from ..pipelines.images import make_grid, save_png
from ..pipelines.precision import DTYPES
from ..pipelines.stable_diffusion import ENCODERS, StableDiffusion
from .base import BaseTrainer
from .config import TrainConfig
from .data import BucketBatches, CaptionedBatch, CaptionedImages, EpochBatches
from .lora_data import Posterior, cache_latents, make_lora_data
from .state import list_states

MODEL_SETTINGS = ("schedule", "num_timesteps", "zero_terminal_snr", "prediction")  # read from the model


def frozen_forward(pipe: StableDiffusion, x: Tensor, t: Tensor, prompts: list[str], sizes: Tensor | None, *,
                   text_grad: bool, embeddings=(), control=None) -> Tensor:
    """The pipeline's U-Net output (float32) for x_t, t and prompts, through the one conditioner.
    ``text_grad``: the prompt encoding keeps its graph (trained text-encoder adapters or
    embeddings); ``sizes`` (b, 6): original (h, w), crop (top, left), target (h, w) for SDXL's y;
    ``control(x, t, context, y)``: the residuals the U-Net adds (a ControlNet with its hint)."""
    encoders = [getattr(pipe, name) for name in ENCODERS[pipe.family]]
    with torch.set_grad_enabled(torch.is_grad_enabled() and text_grad):
        c = encode_prompt(pipe.family, encoders, pipe.tokenizer, prompts, "", zero_empty_negative=True,
                          with_pooled=pipe.size_conditioning, embeddings=embeddings)
    dtype = next(pipe.unet.parameters()).dtype
    y = None
    if pipe.family == "sdxl" or pipe.size_conditioning:
        y = sdxl_vector_cond(c.pooled, sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6]).to(dtype)
    residuals = None if control is None else control(x, t, c.context, y)
    return pipe.unet(x.to(dtype), t, c.context.to(dtype), y, control=residuals).float()


class FineTuneTrainer(BaseTrainer):
    output_option = "output_name"  # the section's option that names the output files, for messages

    def build(self) -> None:
        c, o = self.config, self.options
        self.base_path = Path(o.base_model) if o.base_model else default_model_path(DEFAULT_TEXT_MODEL)
        self.pipe = StableDiffusion.load(self.base_path, device=self.device)
        requires_unet(self.pipe.unet, f"Task {c.task!r}")
        if self.pipe.family == "sdxl_refiner":
            raise ValueError(f"{self.base_path} is an SDXL refiner; task {c.task!r} trains on SD 1.x / 2.x / SDXL "
                             "base models and unfog text-to-image models")
        self._use_model_settings()
        self.started_at = time.time()
        if not list_states(Path(c.out_dir) / "states"):
            for path in self.output_paths():
                if path.exists():
                    raise FileExistsError(f"{path} exists and is not from a training run in {c.out_dir}; choose "
                                          f"another out_dir or {c.task}.{self.output_option}")
        self.data = self.make_data()
        self.net = self.make_network()
        self.latents: list[Posterior] | None = None
        if o.cache_latents != "none":
            path = Path(c.out_dir) / "latent_cache.safetensors" if o.cache_latents == "disk" else None
            self.latents = cache_latents(self.data, self.pipe.vae, self.device, path, progress=self.world.is_main)

    def checkpoint_hash(self) -> str | None:
        """A1111's short hash of the base model file (the first 10 hex digits of its sha256), which
        its embedding and hypernetwork files record as ``sd_checkpoint``; None for a folder."""
        if not hasattr(self, "_checkpoint_hash"):
            self._checkpoint_hash = None
            if self.base_path.is_file():
                with open(self.base_path, "rb") as f:
                    self._checkpoint_hash = sha256_from(f)[:10]
        return self._checkpoint_hash

    def _use_model_settings(self) -> None:
        """The loaded model's schedule and prediction type; a config that sets others is refused."""
        c, pipe = self.config, self.pipe
        changed = [k for k in MODEL_SETTINGS if getattr(c, k) != getattr(TrainConfig, k)]
        if changed:
            mine = DiscreteSchedule.make(c.schedule, c.num_timesteps, zero_terminal_snr=c.zero_terminal_snr)
            a, b = mine.alphas_cumprod, pipe.schedule.alphas_cumprod
            if c.prediction != pipe.prediction or a.shape != b.shape or not torch.allclose(a, b.to(a)):
                raise ValueError(f"task {c.task!r} trains with the model's own noise schedule and prediction type "
                                 f"({pipe.prediction!r}); leave {', '.join(changed)} out of the config")
        self.schedule = pipe.schedule
        self.loss_config = replace(c.loss_config(), prediction=pipe.prediction)

    def freeze(self) -> None:
        """Every model of the pipeline out of training: no gradients, eval mode."""
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(self.pipe, name) is not None:
                getattr(self.pipe, name).requires_grad_(False).eval()

    def cast_frozen(self, keep: set[int]) -> None:
        """The U-Net's and text encoders' weights in ``base_dtype``, but for the tensors whose ids
        are in ``keep`` (trained parts living inside them stay fp32)."""
        dtype = DTYPES[self.options.base_dtype]
        for component in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, component)
            for tensor in [] if model is None else [*model.parameters(), *model.buffers()]:
                if id(tensor) not in keep and tensor.is_floating_point():
                    tensor.data = tensor.data.to(dtype)

    # ---- the task's parts ---------------------------------------------------------------------------
    def make_network(self) -> nn.Module:
        raise NotImplementedError

    def make_data(self) -> CaptionedImages:
        """The captioned images (``lora_data``: "shapes" or a folder, kohya's conventions)."""
        c = self.config
        return make_lora_data(c.data, c.image_size, c.data_size, c.seed, c.center_crop,
                              bucket_step=self.bucket_step(), min_bucket=c.batch_size,
                              shapes_config=c.shapes_config(), workers=c.data_workers)

    def extra_inputs(self, batch: CaptionedBatch) -> dict[str, Tensor]:
        """More inputs of the trained network from this rank's loaded batch; {} (none) by default."""
        return {}

    def bucket_step(self) -> int | None:
        """Aspect-ratio buckets' side step on an image folder, or None (no buckets)."""
        return None

    def prompt_draws(self, b: int, g: torch.Generator) -> tuple[Tensor | None, ...]:
        """The random choices of a global batch's prompts, each (b,) or None, drawn from ``g``."""
        return ()

    def make_prompts(self, captions: list[str], draws: tuple[Tensor | None, ...]) -> list[str]:
        """This rank's captions with its slice of ``prompt_draws`` -> the prompts trained on."""
        return list(captions)

    @contextmanager
    def applied(self):
        """The EMA's trained part in the pipeline (the sample grid draws with it)."""
        raise NotImplementedError
        yield

    def describe(self) -> str:
        """What trains, for the sample grid's description ("LoRA mine")."""
        raise NotImplementedError

    def output_paths(self) -> list[Path]:
        """Every file ``save_model`` writes (a run refuses to start over one it did not write)."""
        return [self.model_path]

    def default_prompts(self) -> list[str]:
        """The grid's prompts without ``validation_prompts``: the first 4 distinct captions."""
        captions = []
        for i in range(len(self.data)):
            if self.data.caption_of(i) not in captions:
                captions.append(self.data.caption_of(i))
            if len(captions) == 4:
                break
        return captions

    # ---- shared ---------------------------------------------------------------------------------------
    def trainable(self) -> nn.Module:
        return self.net

    def make_batches(self) -> EpochBatches | BucketBatches:
        if self.data.bucket_of is None:
            return super().make_batches()
        return BucketBatches(self.data.bucket_of, self.config.batch_size, self.config.seed)

    def posteriors(self, idx: Tensor, seeds: Tensor | None, data: CaptionedImages,
                   latents: list[Posterior] | None) -> tuple[Tensor, Tensor, Tensor, list[str], dict]:
        """Items ``idx`` of ``data`` with its latent cache ``latents`` (or None): the VAE posterior's
        mean and std (b, C, h, w) float32, sizes (b, 6), captions and the ``extra_inputs`` of the
        network (none from the latent cache)."""
        if latents is not None:
            cached = [latents[int(i)] for i in idx]
            captions = [data.caption_of(int(i)) for i in idx]
            return (torch.stack([p.mean for p in cached]), torch.stack([p.std for p in cached]),
                    torch.stack([p.sizes for p in cached]), captions, {})
        batch = data.batch(idx, seeds)
        vae = self.pipe.vae
        with torch.no_grad():
            posterior = vae.encode(batch.images.to(self.device, next(vae.parameters()).dtype))
        return posterior.mean.float(), posterior.std.float(), batch.sizes, batch.captions, self.extra_inputs(batch)

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        return self.batch_loss(idx, model)

    def batch_loss(self, idx: Tensor, model: nn.Module, data: CaptionedImages | None = None,
                   latents: list[Posterior] | None = None, teacher=None) -> Tensor:
        """The diffusion loss of the global batch ``idx`` of ``data`` (the training data by default;
        ``latents`` its cache), every random draw made from ``noise_gen``; ``teacher``: see
        ``diffusion_loss``."""
        if data is None:
            data, latents = self.data, self.latents
        g, b = self.noise_gen, idx.numel()
        h, w = data.target_of(int(idx[0]))  # a batch is of one size (one bucket)
        vae = self.pipe.vae.config
        latent_shape = (b, vae.latent_channels, h // vae.downsample_factor, w // vae.downsample_factor)
        # Every draw is made for the global batch, in a fixed order, then sliced (distributed.py).
        draws = self.prompt_draws(b, g)
        posterior_noise = torch.randn(latent_shape, generator=g)
        t, noise = draw_noise(latent_shape, self.schedule, self.loss_config, g)
        seeds = data.crop_seeds(b, g)  # random crops only
        mine = self.world.local_slice(b)
        mean, std, sizes, captions, extra = self.posteriors(idx[mine], None if seeds is None else seeds[mine], data,
                                                            latents)
        z = (mean + std * posterior_noise[mine].to(mean.device)) * vae.scaling_factor  # (b, C, h / f, w / f)
        prompts = self.make_prompts(captions, tuple(None if d is None else d[mine] for d in draws))
        return diffusion_loss(model, z.to(self.device), self.schedule, self.loss_config, t=t[mine], noise=noise[mine],
                              teacher=teacher, prompts=prompts, sizes=sizes.to(self.device), **extra)

    def validation_prompts(self) -> list[str]:
        """The grid's prompts: the section's ``validation_prompts``, else ``default_prompts``."""
        return list(self.options.validation_prompts) or self.default_prompts()

    def sample_grid(self) -> None:
        c = self.config
        prompts = self.validation_prompts()
        with self.applied():
            images = self.pipe(prompts, steps=c.sample_steps, sampler=c.sample_sampler, cfg_scale=c.sample_cfg_scale,
                               seed=0, batch_size=2, width=c.image_size, height=c.image_size, output="tensor")
        grid = make_grid(images.view(len(prompts), 2, *images.shape[1:]).transpose(0, 1).flatten(0, 1),
                         nrow=len(prompts), scale=2 if c.image_size <= 128 else 1)  # a row per seed
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}; {self.describe()} on {self.base_path.name}; columns: {' | '.join(prompts)}; "
                 f"sampler {c.sample_sampler}, {c.sample_steps} steps, cfg {c.sample_cfg_scale}", overwrite=True)
