"""The training configuration: one frozen dataclass, read from JSON with `key=value` overrides."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..diffusion.denoiser import PREDICTIONS
from ..diffusion.losses import LossConfig
from ..diffusion.registry import resolve_sampler
from ..diffusion.schedules import BETA_SCHEDULES, check_choice


TASKS = ("pixel", "autoencoder", "text2image")


@dataclass(frozen=True)
class TrainConfig:
    # task: "pixel" (a pixel-space U-Net; class-conditional on digits), "autoencoder" (the KL
    # VAE of a latent model, stage 1) or "text2image" (a latent U-Net with cross-attention on a
    # text encoder, stage 2, on the latents of a trained autoencoder)
    task: str = "pixel"
    # data: "digits" (scikit-learn's handwritten digits, class-conditional), "shapes" (the
    # procedural captioned set, ``data_size`` items from ``seed``) or an image folder
    data: str = "digits"
    image_size: int = 16
    data_size: int = 50_000
    center_crop: bool = True  # image folders: centre crops, else random crops
    # text2image and autoencoder: processes that draw or load each batch's images in parallel (0:
    # the training process). Worth it on a GPU, where drawing "shapes" scenes in one process is the bottleneck;
    # the batches are the same for any number, so a run may resume with another.
    data_workers: int = 0
    # data "shapes": the ShapesConfig fields to change (datasets/shapes_text.py), e.g.
    # {"weights": [1, 2, 1, 1, 3, 1]} to draw two-object and position scenes more often
    shapes_options: dict[str, Any] = field(default_factory=dict)
    # text2image on an image folder: aspect-ratio buckets (datasets/buckets.py) of area at most
    # image_size^2 and sides multiples of bucket_step; every batch holds images of one bucket
    buckets: bool = False
    bucket_step: int = 64
    # autoencoder (stage 1): the VAEConfig fields to change from TINY_VAE, and the LDM loss
    vae_overrides: dict[str, Any] = field(default_factory=dict)
    kl_weight: float = 1e-6
    disc_weight: float = 0.0  # > 0: a patch discriminator's hinge loss, from step disc_start
    disc_start: int = 0
    # text2image (stage 2): the trained autoencoder file, the text encoder (CLIPTextConfig fields
    # to change from the small default) and whether it trains with the U-Net (as in LDM)
    vae_model: str | None = None
    text_encoder: dict[str, Any] = field(default_factory=dict)
    train_text_encoder: bool = True
    # SDXL's micro-conditioning: the U-Net also sees y = [pooled text output, Fourier features of
    # the image's original size, crop top-left and target size] (num_classes="sequential")
    size_conditioning: bool = False
    model_dtype: str = "fp32"  # precision of the weights in model.safetensors (the states keep fp32)
    # model: a U-Net preset and the fields of its UNetConfig to change
    model: str = "DIGITS"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # diffusion
    schedule: str = "linear"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    prediction: str = "eps"
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    # timesteps: "none" (uniform), "later" (the last timestep_bias_portion of them, the noisiest,
    # drawn timestep_bias_multiplier times as often) or "earlier" (the first portion)
    timestep_bias: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    cond_dropout: float = 0.1  # probability of training a sample with the null class (for CFG)
    # optimisation
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "bf16"
    seed: int = 0
    # output
    out_dir: str = "runs/digits"
    log_every: int = 50
    sample_every: int = 1000
    save_every: int = 1000
    keep_last: int = 3
    sample_sampler: str = "dpmpp_2m"
    sample_steps: int = 20
    sample_cfg_scale: float = 2.0

    def __post_init__(self):
        check_choice("schedule", self.schedule, BETA_SCHEDULES)
        check_choice("prediction type", self.prediction, PREDICTIONS)
        check_choice("precision", self.precision, ("bf16", "fp32"))
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_choice("task", self.task, TASKS)
        check_choice("model_dtype", self.model_dtype, ("fp32", "fp16", "bf16"))
        if self.task == "text2image" and self.vae_model is None:
            raise ValueError("task 'text2image' trains on the latents of an autoencoder: set vae_model to the "
                             "model.safetensors of an 'autoencoder' run")
        if self.task != "pixel" and self.data == "digits":
            raise ValueError(f"task {self.task!r} needs RGB data: 'shapes' or an image folder, not 'digits'")
        if self.kl_weight < 0 or self.disc_weight < 0 or self.disc_start < 0:
            raise ValueError("kl_weight, disc_weight and disc_start must be >= 0")
        for name, on in (("buckets", self.buckets), ("size_conditioning", self.size_conditioning)):
            if on and self.task != "text2image":
                raise ValueError(f"{name} is an option of task 'text2image', not {self.task!r}")
        if self.buckets and self.data in ("digits", "shapes"):
            raise ValueError(f"buckets need an image folder of images of many shapes, not {self.data!r}")
        if self.data_size < 1:
            raise ValueError(f"data_size must be >= 1, got {self.data_size}")
        if self.shapes_options:
            if self.data != "shapes":
                raise ValueError(f"shapes_options apply to data 'shapes', not {self.data!r}")
            self.shapes_config()  # an unknown field or a bad value fails here, not mid-run
        resolve_sampler(self.sample_sampler)
        self.loss_config()  # min_snr_gamma and the timestep bias are checked here
        for name in ("image_size", "steps", "batch_size", "num_timesteps", "log_every", "sample_every",
                     "save_every", "keep_last", "sample_steps", "bucket_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}")
        if self.data_workers and self.task == "pixel":
            raise ValueError("data_workers is an option of tasks 'text2image' and 'autoencoder' (the pixel task's "
                             "data sets are in memory); set it to 0")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0 and warmup_steps >= 0")
        if self.sample_cfg_scale < 0:
            raise ValueError(f"sample_cfg_scale must be >= 0, got {self.sample_cfg_scale}")

    def loss_config(self) -> LossConfig:
        """The training objective: prediction type, Min-SNR weighting, offset noise, timestep bias."""
        return LossConfig(self.prediction, self.min_snr_gamma, self.offset_noise, self.timestep_bias,
                          self.timestep_bias_multiplier, self.timestep_bias_portion)

    def shapes_config(self):
        """The ShapesConfig of data "shapes": the defaults with ``shapes_options`` applied; None
        for any other data."""
        from ..datasets.shapes_text import ShapesConfig

        if self.data != "shapes":
            return None
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in self.shapes_options.items()}
        return with_overrides(ShapesConfig(), options, "shapes_options")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as out_dir=runs/x


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(values) - set(_field_names()))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(_field_names())}")
    return TrainConfig(**values)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a JSON config (or start from the defaults when ``path`` is None) and apply
    ``key=value`` overrides, where value is JSON (numbers, true/false, null, lists) or a string."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        values[key.strip()] = _parse_value(value)
    return config_from_dict(values)


# Settings that do not change the training trajectory; a resumed run may change them freely.
RESUMABLE_CHANGES = ("steps", "data_workers", "model_dtype", "log_every", "sample_every", "save_every", "keep_last",
                     "sample_sampler", "sample_steps", "sample_cfg_scale")


def _defaults() -> dict[str, Any]:
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(TrainConfig)}


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore=RESUMABLE_CHANGES) -> list[str]:
    """Human-readable `key: old -> new` lines for the fields that differ. A field missing from
    either (a state saved before the field existed) counts as its default."""
    defaults = _defaults()
    return field_differences({**defaults, **old}, {**defaults, **new}, ignore)


def field_differences(old: dict[str, Any], new: dict[str, Any], ignore=()) -> list[str]:
    """`key: old -> new` for each key of either dict whose values differ (a missing key is None)."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


def with_overrides(base, changes: dict[str, Any], what: str):
    """``base`` (a frozen config dataclass) with the fields in ``changes`` replaced; an unknown
    field is a ValueError naming ``what`` (the config key that held them) and the valid fields."""
    try:
        return replace(base, **changes)
    except TypeError as err:
        raise ValueError(f"{what}: {err}; valid keys: {', '.join(type(base).__dataclass_fields__)}") from None
