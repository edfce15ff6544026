"""Task "lora": a LoRA (Hu et al. 2021; LoCon with ``conv_rank``; LyCORIS' LoHa or LoKr with
``algo``) trained on a frozen model that unfog loads: an official SD 1.x / 2.x / SDXL single file
or diffusers folder, or an unfog text-to-image file (the embedded "shapes" model by default). Only
the adapters train.

The model loads through ``StableDiffusion.load``, so every format the pipelines read works, and
the training uses that pipeline's own pieces: its noise schedule and prediction type (a config
that sets ``schedule``, ``num_timesteps``, ``zero_terminal_snr`` or ``prediction`` to something
else is refused), and its prompt encoding (``conditioning.encode_prompt``: one conditioner for
training and inference; SDXL's vector y from the pooled output and each image's sizes).

Targets, as kohya's ``networks/lora.py``: in the U-Net every Linear and 1x1 conv inside the
transformer blocks (attention q/k/v/out, feed-forward, proj_in / proj_out) at ``rank``; with
``conv_rank`` (LoCon) also the ResBlocks' and down/up-sampling blocks' layers, 3x3 convs at
``conv_rank`` and the rest at ``rank``; with ``text_encoder_lora`` the text encoders'
q/k/v/out_proj and fc1/fc2.

The frozen models never enter the module the optimiser, EMA and DDP see (``LoraNetwork``): its
parameters and state dict are the adapters alone, so states are small and the EMA copies only
them. Its forward binds its adapters into the frozen models' ``TrainableLayer`` wrappers and runs
them, so the EMA's copy, bound the same way, is the EMA model (the sample grid draws with it).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.lora import LoraFile, ModuleIndex, Target, check_family, kohya_metadata, read_lora, save_lora
from ..conditioning import encode_prompt, sdxl_vector_cond
from ..diffusion.losses import diffusion_loss, draw_noise
from ..diffusion.schedules import DiscreteSchedule
from ..embedded import DEFAULT_TEXT_MODEL, default_model_path
from ..models.clip_text import CLIPAttention, CLIPMLP
from ..nn.blocks import Downsample, ResBlock, SpatialTransformer, Upsample
from ..nn.lora import AdapterWeights, TrainableLayer, add_lora
from ..pipelines.images import make_grid, save_png
from ..pipelines.precision import DTYPES
from ..pipelines.stable_diffusion import ENCODERS, StableDiffusion
from .base import BaseTrainer
from .config import LoraOptions, TrainConfig, field_differences
from .data import BucketBatches, EpochBatches
from .lora_data import Posterior, cache_latents, make_lora_data, transform_captions
from .state import list_states

UNET_BLOCKS = (SpatialTransformer,)
CONV_BLOCKS = (ResBlock, Downsample, Upsample)  # LoCon
TEXT_BLOCKS = (CLIPAttention, CLIPMLP)
MODEL_SETTINGS = ("schedule", "num_timesteps", "zero_terminal_snr", "prediction")  # read from the model
# the kohya fields of a LoRA file that --init-from compares with the new run (resumes.jsonl)
RECORDED = ("ss_sd_model_name", "ss_base_model_version", "ss_v_parameterization", "ss_resolution",
            "ss_num_train_images", "ss_max_train_steps", "ss_learning_rate", "ss_seed")


def default_targets(model: nn.Module, blocks: tuple[type, ...]) -> dict[str, bool]:
    """Every Linear / Conv2d inside a module of type ``blocks``: its path -> whether it is a conv
    with a kernel larger than 1x1 (LoCon's ``conv_rank``), in the model's module order."""
    found: dict[str, bool] = {}
    for name, block in model.named_modules():
        if isinstance(block, blocks):
            for child, module in block.named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    found[f"{name}.{child}" if name else child] = isinstance(module, nn.Conv2d) and \
                        module.kernel_size != (1, 1)
    return found


class _Adapter(nn.Module):
    """The trained factors of one TrainableLayer (the same modules / Parameters, under the layer's
    ``factor_names``): LoRA's lora_down (r, in[, kh, kw]) and lora_up (out, r[, 1, 1]) modules, LoHa's
    hada_*, LoKr's lokr_* tensors."""

    def __init__(self, layer: TrainableLayer):
        super().__init__()
        for name in layer.factor_names:
            setattr(self, name, getattr(layer, name))


class Frozen:
    """The loaded pipeline with TrainableLayers in it, by adapter key; not a module, so never copied,
    saved or handed to the optimiser."""

    def __init__(self, pipe: StableDiffusion, layers: dict[str, TrainableLayer], targets: dict[str, Target],
                 train_text_encoder: bool):
        self.pipe, self.layers, self.targets, self.train_text_encoder = pipe, layers, targets, train_text_encoder


class LoraNetwork(nn.Module):
    """The adapters (``adapters``: key "component/dotted/path" -> factors) and a forward that runs
    the frozen model with them: (x_t, t, prompts, per-sample sizes) -> the U-Net's output."""

    def __init__(self, adapters: nn.ModuleDict, frozen: Frozen):
        super().__init__()
        self.adapters = adapters
        self.frozen = frozen

    def __deepcopy__(self, memo) -> "LoraNetwork":
        twin = LoraNetwork(copy.deepcopy(self.adapters, memo), self.frozen)  # the frozen model is shared
        return twin.train(self.training)

    def bind(self) -> None:
        """Make the frozen model's TrainableLayers use these adapters."""
        for key, layer in self.frozen.layers.items():
            for name in layer.factor_names:
                setattr(layer, name, getattr(self.adapters[key], name))

    def forward(self, x: Tensor, t: Tensor, prompts: list[str], sizes: Tensor | None = None) -> Tensor:
        self.bind()
        pipe = self.frozen.pipe
        encoders = [getattr(pipe, name) for name in ENCODERS[pipe.family]]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen.train_text_encoder):
            c = encode_prompt(pipe.family, encoders, pipe.tokenizer, prompts, "", zero_empty_negative=True,
                              with_pooled=pipe.size_conditioning)
        dtype = next(pipe.unet.parameters()).dtype
        y = None
        if pipe.family == "sdxl" or pipe.size_conditioning:  # original (h, w), crop (top, left), target (h, w)
            y = sdxl_vector_cond(c.pooled, sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6]).to(dtype)
        return pipe.unet(x.to(dtype), t, c.context.to(dtype), y).float()

    def adapter_weights(self) -> dict[Target, AdapterWeights]:
        """The adapters as a LoRA file stores them, on their targets."""
        layers = self.frozen.layers
        return {self.frozen.targets[key]: layers[key].adapter_weights(a) for key, a in self.adapters.items()}


class LoraTrainer(BaseTrainer):
    options: LoraOptions

    def build(self) -> None:
        c, o = self.config, self.options
        self.base_path = Path(o.base_model) if o.base_model else default_model_path(DEFAULT_TEXT_MODEL)
        self.pipe = StableDiffusion.load(self.base_path, device=self.device)
        if self.pipe.family == "sdxl_refiner":
            raise ValueError(f"{self.base_path} is an SDXL refiner; task 'lora' trains on SD 1.x / 2.x / SDXL base "
                             "models and unfog text-to-image models")
        self._use_model_settings()
        self.started_at = time.time()
        if self.model_path.exists() and not list_states(Path(c.out_dir) / "states"):
            raise FileExistsError(f"{self.model_path} exists and is not from a training run in {c.out_dir}; choose another "
                                  "out_dir or lora.output_name")
        self.data = make_lora_data(c.data, c.image_size, c.data_size, c.seed, c.center_crop,
                                   bucket_step=o.aspect_bucket_step if o.aspect_buckets else None, min_bucket=c.batch_size,
                                   shapes_config=c.shapes_config(), workers=c.data_workers)
        self.net = LoraNetwork(*self._add_adapters())
        if o.gradient_checkpointing:
            self.pipe.unet.config = replace(self.pipe.unet.config, gradient_checkpointing=True)
        self.latents: list[Posterior] | None = None
        if o.cache_latents != "none":
            path = Path(c.out_dir) / "latent_cache.safetensors" if o.cache_latents == "disk" else None
            self.latents = cache_latents(self.data, self.pipe.vae, self.device, path, progress=self.world.is_main)

    def _use_model_settings(self) -> None:
        """The loaded model's schedule and prediction type; a config that sets others is refused."""
        c, pipe = self.config, self.pipe
        changed = [k for k in MODEL_SETTINGS if getattr(c, k) != getattr(TrainConfig, k)]
        if changed:
            mine = DiscreteSchedule.make(c.schedule, c.num_timesteps, zero_terminal_snr=c.zero_terminal_snr)
            a, b = mine.alphas_cumprod, pipe.schedule.alphas_cumprod
            if c.prediction != pipe.prediction or a.shape != b.shape or not torch.allclose(a, b.to(a)):
                raise ValueError(f"task 'lora' trains with the model's own noise schedule and prediction type "
                                 f"({pipe.prediction!r}); leave {', '.join(changed)} out of the config")
        self.schedule = pipe.schedule
        self.loss_config = replace(c.loss_config(), prediction=pipe.prediction)

    def _add_adapters(self) -> tuple[nn.ModuleDict, Frozen]:
        """Freeze the models, wrap the default targets in ``lora.algo``'s TrainableLayers (fp32
        adapters; seeded), then cast the frozen weights to ``base_dtype``."""
        c, o, pipe = self.config, self.options, self.pipe
        components = ["unet"] + (list(ENCODERS[pipe.family]) if o.text_encoder_lora else [])
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name) is not None:
                getattr(pipe, name).requires_grad_(False).eval()
        torch.manual_seed(c.seed)
        layers, targets = {}, {}
        for component in components:
            model = getattr(pipe, component)
            blocks = UNET_BLOCKS + (CONV_BLOCKS if o.conv_rank and component == "unet" else ())
            found = default_targets(model, blocks if component == "unet" else TEXT_BLOCKS)
            wrapped = {**add_lora(model, [p for p, conv in found.items() if not conv], o.rank, o.alpha, o.algo),
                       **add_lora(model, [p for p, conv in found.items() if conv], o.conv_rank or 1, o.conv_alpha,
                                  o.algo)}
            for path in found:  # in module order
                key = f"{component}/{path.replace('.', '/')}"
                layers[key], targets[key] = wrapped[path], Target(component, path, wrapped[path].base)
        adapters = nn.ModuleDict({key: _Adapter(layer) for key, layer in layers.items()})
        trained = {id(p) for p in adapters.parameters()}
        dtype = DTYPES[o.base_dtype]
        for component in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, component)
            for tensor in [] if model is None else [*model.parameters(), *model.buffers()]:
                if id(tensor) not in trained and tensor.is_floating_point():
                    tensor.data = tensor.data.to(dtype)
        return adapters, Frozen(pipe, layers, targets, o.text_encoder_lora)

    def trainable(self) -> nn.Module:
        return self.net

    def make_batches(self) -> EpochBatches | BucketBatches:
        if self.data.bucket_of is None:
            return super().make_batches()
        return BucketBatches(self.data.bucket_of, self.config.batch_size, self.config.seed)

    def posteriors(self, idx: Tensor, seeds: Tensor | None) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        """Items ``idx``: the VAE posterior's mean and std (b, C, h, w) float32, sizes (b, 6) and captions."""
        if self.latents is not None:
            cached = [self.latents[int(i)] for i in idx]
            captions = [self.data.caption_of(int(i)) for i in idx]
            return (torch.stack([p.mean for p in cached]), torch.stack([p.std for p in cached]),
                    torch.stack([p.sizes for p in cached]), captions)
        batch = self.data.batch(idx, seeds)
        vae = self.pipe.vae
        with torch.no_grad():
            posterior = vae.encode(batch.images.to(self.device, next(vae.parameters()).dtype))
        return posterior.mean.float(), posterior.std.float(), batch.sizes, batch.captions

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        o, g, b = self.options, self.noise_gen, idx.numel()
        h, w = self.data.target_of(int(idx[0]))  # a batch is of one size (one bucket)
        vae = self.pipe.vae.config
        latent_shape = (b, vae.latent_channels, h // vae.downsample_factor, w // vae.downsample_factor)
        # Every draw is made for the global batch, in a fixed order, then sliced (distributed.py).
        drop = torch.rand(b, generator=g) < o.caption_dropout
        shuffle = torch.randint(0, 2**62, (b,), generator=g) if o.shuffle_tags else None
        posterior_noise = torch.randn(latent_shape, generator=g)
        t, noise = draw_noise(latent_shape, self.schedule, self.loss_config, g)
        seeds = self.data.crop_seeds(b, g)  # random crops only
        mine = self.world.local_slice(b)
        mean, std, sizes, captions = self.posteriors(idx[mine], None if seeds is None else seeds[mine])
        z = (mean + std * posterior_noise[mine].to(mean.device)) * vae.scaling_factor  # (b, C, h / f, w / f)
        prompts = transform_captions(captions, drop[mine], None if shuffle is None else shuffle[mine], o.keep_tokens)
        return diffusion_loss(model, z.to(self.device), self.schedule, self.loss_config, t=t[mine], noise=noise[mine],
                              prompts=prompts, sizes=sizes.to(self.device))

    def validation_prompts(self) -> list[str]:
        """The grid's prompts: ``lora.validation_prompts``, else the first 4 distinct captions."""
        if self.options.validation_prompts:
            return list(self.options.validation_prompts)
        captions = []
        for i in range(len(self.data)):
            if self.data.caption_of(i) not in captions:
                captions.append(self.data.caption_of(i))
            if len(captions) == 4:
                break
        return captions

    @property
    def model_path(self) -> Path:
        return Path(self.config.out_dir) / f"{self.options.output_name}.safetensors"

    def metadata(self) -> dict[str, str]:
        """kohya's ``ss_*`` and ``modelspec.*`` fields of this run's LoRA file, at the current step."""
        c, o, pipe = self.config, self.options, self.pipe
        extra = {"ss_sd_model_name": self.base_path.name, "ss_num_train_images": str(len(self.data)),
                 "ss_max_train_steps": str(c.steps), "ss_steps": str(self.step), "ss_learning_rate": str(c.lr),
                 "ss_seed": str(c.seed), "ss_network_train_unet_only": str(not o.text_encoder_lora)}
        return kohya_metadata(pipe.family, rank=o.rank, alpha=o.alpha, output_name=o.output_name,
                              started_at=self.started_at, prediction=pipe.prediction,
                              conv_rank=o.conv_rank or None, conv_alpha=o.conv_alpha if o.conv_rank else None,
                              resolution=c.image_size, algo=o.algo, extra=extra)

    def save_model(self) -> None:
        """The EMA adapters as a kohya LoRA file, ``out_dir/<output_name>.safetensors`` (ours to
        replace: ``build`` refused a file of that name that is not from this run)."""
        pipe = self.pipe
        save_lora(self.model_path, self.ema.model.adapter_weights(), pipe.family, self.metadata(),
                  unet_config=pipe.unet.config, overwrite=True)

    def load_weights(self, path: Path) -> list[str]:
        """Continue training a LoRA file (``--init-from some.safetensors``, kohya's ``--network_weights``):
        any file ``read_lora`` reads (kohya / LoCon, PEFT or diffusers naming; LyCORIS LoHa / LoKr).
        Its factors become the adapters and the EMA; the optimizer, LR schedule and step start afresh.

        Each of its adapters must be of ``lora.algo``'s kind, holding the tensors this config's layer
        trains (lora_down, lora_up; hada_w*; lokr_w1 with lokr_w2 or lokr_w2_a / _b as LyCORIS' defaults
        lay them out: the CP / Tucker forms and DoRA have no trainer here), for the model's family
        (``check_family``), on a layer this config trains, at this config's rank and alpha (3x3 convs:
        ``lora.conv_rank`` / ``conv_alpha``; a LoKr layer with a full lokr_w2 has neither).
        Another alpha is refused rather than converted: alpha / rank scales the factors' gradients,
        so continuing at another alpha is not the same training, and rescaling lora_up to keep the
        product is exact only for powers of two; refused, the file's factors load bit for bit and
        one setting fixes it. Layers the config trains that the file lacks start fresh, as kohya's
        ``--network_weights`` leaves them, with a note of the count. Returns that note and the
        differences between the run the file records (its kohya ``ss_*`` fields) and this one,
        for ``resumes.jsonl``."""
        frozen, lora = self.net.frozen, read_lora(path)
        found = self._fitting_adapters(lora)
        with torch.no_grad():
            for key, adapter in found.items():
                mine = self.net.adapters[key]
                for name in frozen.layers[key].factor_names:
                    factor = getattr(mine, name)
                    weight = factor.weight if isinstance(factor, nn.Module) else factor  # LoRA's are modules
                    weight.copy_(adapter.tensors[name].reshape(weight.shape))
        self.ema.model.load_state_dict(self.net.state_dict())
        changes = []
        if len(found) < len(frozen.targets):
            changes.append(f"{len(frozen.targets) - len(found)} of the {len(frozen.targets)} adapters this config "
                           f"trains are not in {lora.path.name} and start fresh")
            if self.world.is_main:
                print(f"note: {changes[-1]}", file=sys.stderr)
        recorded = {k: str(lora.metadata[k]) for k in RECORDED if k in lora.metadata}
        return changes + field_differences(recorded, {k: self.metadata()[k] for k in recorded})

    def _fitting_adapters(self, lora: LoraFile) -> dict[str, AdapterWeights]:
        """The file's adapters by our adapter key, each checked as ``load_weights`` says; an
        adapter that does not fit is a one-line ValueError naming the setting that would."""
        o, pipe, frozen, path = self.options, self.pipe, self.net.frozen, lora.path
        kinds = sorted({a.kind for a in lora.adapters.values()} - {o.algo})
        trained = {name for layer in frozen.layers.values() for name in layer.factor_names}
        extra = sorted({k for a in lora.adapters.values() if a.kind == o.algo for k in a.tensors} - trained)
        if kinds or extra:
            found = ", ".join([f"{k} adapters" for k in kinds] + [f"{t} tensors" for t in extra])
            hint = f"; lora.algo={kinds[0]} trains its kind" if len(kinds) == 1 and not extra else ""
            raise ValueError(f"{path} is not a plain {o.algo} file ({found}); with lora.algo={o.algo} task 'lora' "
                             f"trains {', '.join(sorted(trained))}, so it can continue such a file only{hint}")
        check_family(lora, pipe.unet, pipe.text_encoder, pipe.text_encoder_2, str(self.base_path))
        models = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")}
        found, unmatched = ModuleIndex(models).resolve(lora)
        if unmatched:
            raise ValueError(f"{path}: {len(unmatched)} of its modules are no layer of {self.base_path}, e.g. "
                             f"{', '.join(sorted(unmatched)[:3])}; is it a LoRA for this model?")
        key_of = {target: key for key, target in frozen.targets.items()}
        untrained = [t for t in found if t not in key_of]
        if untrained:
            text = sum(t.is_text for t in untrained)
            where = [f"{text} in the text encoders (lora.text_encoder_lora=true trains them)"] if text else []
            if len(untrained) > text:
                where.append(f"{len(untrained) - text} in the U-Net (" + ("lora.conv_rank > 0 trains its ResBlock and "
                             "sampling convs" if not o.conv_rank else "layers task 'lora' does not train") + ")")
            first = untrained[0]
            raise ValueError(f"{path} has adapters on {len(untrained)} layers this config does not train: "
                             f"{'; '.join(where)}; e.g. {first.component}.{first.path}")
        wrong: dict[str, set[str]] = defaultdict(set)  # "lora.rank=4" -> the file's values there
        for target, adapter in found.items():
            ours = frozen.layers[key_of[target]].adapter_weights()  # the rank and scale a file of it states
            conv = isinstance(target.module, nn.Conv2d) and target.module.kernel_size != (1, 1)
            rank, alpha = ("conv_rank", "conv_alpha") if conv else ("rank", "alpha")
            shapes = {k: v.numel() for k, v in adapter.tensors.items()}
            if adapter.rank != ours.rank:
                wrong[f"lora.{rank}={getattr(o, rank)}"].add(f"rank {adapter.rank}")
            elif shapes != {k: v.numel() for k, v in ours.tensors.items()}:
                raise ValueError(f"{path}: the {adapter.kind} tensors of {target.component}.{target.path} are laid out "
                                 f"otherwise than this config trains them ({', '.join(sorted(adapter.tensors))} with "
                                 f"{sorted(shapes.values())} elements, not {', '.join(ours.tensors)}); task 'lora' "
                                 "trains LyCORIS' default layout")
            elif not math.isclose(adapter.scale, ours.scale, rel_tol=1e-6):
                wrong[f"lora.{alpha}={getattr(o, alpha):g}"].add(f"alpha {adapter.alpha or adapter.rank:g}")
        if wrong:
            raise ValueError(f"{path} does not fit this config: " + "; ".join(
                f"it has {', '.join(sorted(v))} where {k}" for k, v in wrong.items())
                + " (set them to the file's values; its alpha / rank scale is kept, not converted)")
        return {key_of[target]: adapter for target, adapter in found.items()}

    def sample_grid(self) -> None:
        c = self.config
        prompts = self.validation_prompts()
        self.ema.model.bind()  # the EMA adapters in the frozen model
        try:
            images = self.pipe(prompts, steps=c.sample_steps, sampler=c.sample_sampler, cfg_scale=c.sample_cfg_scale,
                               seed=0, batch_size=2, width=c.image_size, height=c.image_size, output="tensor")
        finally:
            self.net.bind()
        grid = make_grid(images.view(len(prompts), 2, *images.shape[1:]).transpose(0, 1).flatten(0, 1),
                         nrow=len(prompts), scale=2 if c.image_size <= 128 else 1)  # a row per seed
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png",
                 f"step {self.step}; LoRA {self.options.output_name} on {self.base_path.name}; columns: "
                 f"{' | '.join(prompts)}; sampler {c.sample_sampler}, {c.sample_steps} steps, cfg {c.sample_cfg_scale}",
                 overwrite=True)
