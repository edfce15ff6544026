"""The training configuration: shared fields plus one typed, frozen section for the task, read
from JSON with `key=value` overrides (dotted for a section's keys: `text2image.vae_model=...`).

    {"task": "text2image", "data": "shapes", "lr": 5e-4, ...,
     "text2image": {"vae_model": "runs/shapes_vae/model.safetensors", "size_conditioning": true}}

The tasks are a registry by name, ``TASKS``: each names its options (the section) and its
trainer, so a new task is one entry; the sections themselves are in ``sections.py``. Every value
is checked against its field's annotation (``typed.py``).

Configs written before the sections existed (every key at top level, as the model files and
training states of older runs hold them) still load: a top-level key of the task's section moves
into it; a key of another task's section is dropped when it holds its default (old saved configs
list every key of every task) and is an error naming its new place otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..diffusion.denoiser import PREDICTIONS
from ..diffusion.losses import LossConfig
from ..diffusion.registry import resolve_sampler
from ..diffusion.schedules import BETA_SCHEDULES, check_choice
from .sections import (AutoencoderOptions, ControlNetTrainingOptions, HypernetworkTrainingOptions, LoraOptions,
                       PixelOptions, TaskOptions, Text2ImageOptions, TextualInversionOptions)
from .typed import check_types, defaults, describe, field_differences, field_hints, fits, with_overrides

if TYPE_CHECKING:
    from .base import BaseTrainer




# ---- the registry of tasks ------------------------------------------------------------------------------
def _pixel_trainer() -> type[BaseTrainer]:
    from .pixel import PixelTrainer

    return PixelTrainer


def _autoencoder_trainer() -> type[BaseTrainer]:
    from .autoencoder import AutoencoderTrainer

    return AutoencoderTrainer


def _text2image_trainer() -> type[BaseTrainer]:
    from .text2image import TextToImageTrainer

    return TextToImageTrainer


def _lora_trainer() -> type[BaseTrainer]:
    from .lora import LoraTrainer

    return LoraTrainer


def _textual_inversion_trainer() -> type[BaseTrainer]:
    from .textual_inversion import TextualInversionTrainer

    return TextualInversionTrainer


def _hypernetwork_trainer() -> type[BaseTrainer]:
    from .hypernetwork import HypernetworkTrainer

    return HypernetworkTrainer


def _controlnet_trainer() -> type[BaseTrainer]:
    from .controlnet import ControlNetTrainer

    return ControlNetTrainer


@dataclass(frozen=True)
class Task:
    """A training task: its section of the config and its trainer (imported when first asked
    for: the trainer modules import this one)."""

    options: type[TaskOptions]
    load_trainer: Callable[[], type[BaseTrainer]]
    description: str


TASKS: dict[str, Task] = {
    "pixel": Task(PixelOptions, _pixel_trainer, "a pixel-space U-Net; class-conditional on digits"),
    "autoencoder": Task(AutoencoderOptions, _autoencoder_trainer, "the KL VAE of a latent model (stage 1)"),
    "text2image": Task(Text2ImageOptions, _text2image_trainer,
                       "a latent U-Net with cross-attention on a text encoder, on an autoencoder's latents (stage 2)"),
    "lora": Task(LoraOptions, _lora_trainer, "a LoRA / LoCon on a frozen model unfog loads (SD 1.x, 2.x, SDXL, "
                 "an unfog text-to-image file)"),
    "textual_inversion": Task(TextualInversionOptions, _textual_inversion_trainer,
                              "a textual-inversion embedding (new token vectors for a word) on a frozen model unfog "
                              "loads"),
    "hypernetwork": Task(HypernetworkTrainingOptions, _hypernetwork_trainer,
                         "a hypernetwork (A1111's k / v context modules for attention) on a frozen model unfog loads"),
    "controlnet": Task(ControlNetTrainingOptions, _controlnet_trainer,
                       "a ControlNet (a trained copy of the U-Net's encoder, fed a hint image) for a frozen model unfog "
                       "loads"),
}


def get_task(name: str) -> Task:
    check_choice("task", name, tuple(TASKS))
    return TASKS[name]


# ---- the config -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    # task: a name in TASKS: "pixel", "autoencoder", "text2image", "lora", "textual_inversion", "hypernetwork" or
    # "controlnet"; its own settings are the section ``options`` (TASKS[task].options; in JSON, the key named
    # after the task)
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
    precision: str = "auto"  # bf16 autocast, or fp32; auto: bf16 where it is fast (pipelines.precision)
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
    # the task's section (None: its defaults)
    options: TaskOptions | None = None

    def __post_init__(self):
        check_types(self)
        task = get_task(self.task)
        if self.options is None:
            object.__setattr__(self, "options", task.options())
        if type(self.options) is not task.options:
            raise ValueError(f"the options of task {self.options.section!r} were given to a config of "
                             f"task {self.task!r}")
        check_choice("schedule", self.schedule, BETA_SCHEDULES)
        check_choice("prediction type", self.prediction, PREDICTIONS)
        check_choice("precision", self.precision, ("auto", "bf16", "fp32"))
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if self.data_size < 1:
            raise ValueError(f"data_size must be >= 1, got {self.data_size}")
        if self.shapes_options:
            if self.data != "shapes":
                raise ValueError(f"shapes_options apply to data 'shapes', not {self.data!r}")
            self.shapes_config()  # an unknown field or a bad value fails here, not mid-run
        resolve_sampler(self.sample_sampler)
        self.loss_config()  # min_snr_gamma and the timestep bias are checked here
        for name in ("image_size", "steps", "batch_size", "num_timesteps", "log_every", "sample_every",
                     "save_every", "keep_last", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0 and warmup_steps >= 0")
        if self.sample_cfg_scale < 0:
            raise ValueError(f"sample_cfg_scale must be >= 0, got {self.sample_cfg_scale}")
        self.options.check(self)

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
        """The config as JSON reads it: the shared fields, then the task's section under its name."""
        values = asdict(self)
        values[self.task] = values.pop("options")
        return values


SHARED_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "options")


# ---- reading configs ------------------------------------------------------------------------------------
def _option_keys(task: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(TASKS[task].options))


def _owner(key: str) -> str | None:
    """The task whose section holds ``key`` (a top-level key of older configs), if any."""
    return next((name for name in TASKS if key in _option_keys(name)), None)


def _sectioned(values: dict[str, Any], task: str, strict: bool = True) -> dict[str, Any]:
    """``values`` (a config of ``task``) with the top-level keys of older configs that belong to the
    task's section moved into it. One of another task's section is dropped when it holds its
    default (an old saved config lists them all); otherwise it is a ValueError naming its new
    key, or (not ``strict``: reading a saved config) dropped too."""
    out = dict(values)
    section = out.get(task, {})
    if not isinstance(section, dict):
        return out  # config_from_dict names the problem
    section = dict(section)
    for key in [k for k in values if k not in SHARED_KEYS and k not in TASKS]:
        owner = task if key in _option_keys(task) else _owner(key)  # the fine-tuning tasks share names
        if owner == task:
            if key in section:
                raise ValueError(f"{key} is given twice: at top level (its place in older configs) and as "
                                 f"{task}.{key}; keep {task}.{key}")
            section[key] = out.pop(key)
        elif owner is not None:
            value = out.pop(key)
            if strict and value != defaults(TASKS[owner].options)[key]:
                raise ValueError(f"{key} is an option of task {owner!r} (config key {owner}.{key}), not of "
                                 f"task {task!r}")
    out[task] = section
    return out


def config_from_dict(values: Any, what: str = "the config") -> TrainConfig:
    """The TrainConfig of a dict as ``to_dict`` writes it, or as older runs wrote it (flat)."""
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a JSON object of config keys, got {describe(type(values))}")
    task = values.get("task", TrainConfig.task)
    if not isinstance(task, str):
        raise ValueError(f"config key task: expected a string, got {task!r}")
    spec = get_task(task)
    other = next((k for k in values if k in TASKS and k != task), None)
    if other is not None:
        raise ValueError(f"config key {other} is the section of task {other!r}, not of this config's task {task!r} "
                         f"(task={other} trains that task)")
    values = _sectioned(values, task)
    section = values.pop(task)
    if not isinstance(section, dict):
        raise ValueError(f"config key {task}: expected a JSON object (the options of task {task!r}), got {section!r}")
    unknown = sorted(set(values) - set(SHARED_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(SHARED_KEYS)}, "
                         f"and the section {task}")
    valid = _option_keys(task)
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{task}.{k}' for k in unknown)}; valid keys of "
                         f"section {task}: {', '.join(valid) or 'none'}")
    return TrainConfig(**values, options=spec.options(**section))


def _hint(keys: tuple[str, ...], task: Any) -> Any:
    """The annotation of the field that the dotted ``keys`` name, or None."""
    if len(keys) == 1:
        return field_hints(TrainConfig).get(keys[0])
    if len(keys) == 2 and keys[0] == task and task in TASKS:
        return field_hints(TASKS[task].options).get(keys[1])
    return None


def _parse_value(text: str, hint: Any = None) -> Any:
    """JSON (numbers, true/false, null, lists, objects), else the bare string (out_dir=runs/x);
    the bare string also where the field wants a string and the JSON reading is not one (out_dir=2024)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if hint is not None and not fits(value, hint) and fits(text, hint):
        return text
    return value


def _set(values: dict[str, Any], keys: tuple[str, ...], value: Any, item: str) -> None:
    """Set ``values[keys[0]][keys[1]]...`` to ``value``, making the JSON objects on the way."""
    node = values
    for key in keys[:-1]:
        child = node.get(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: config key {key} holds {child!r}, not keys")
        node[key] = dict(child)
        node = node[key]
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a JSON config (or start from the defaults when ``path`` is None) and apply
    ``key=value`` overrides, where value is JSON or a string and a dotted key names a key of a
    section (``text2image.vae_model=...``) or of a JSON object (``model_overrides.dropout=0.1``).
    A top-level key of the task's section, as older configs had them, is moved into it."""
    values: Any = {}
    what = "the config"
    if path is not None:
        path, what = Path(path), str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of config keys, got {describe(type(values))}")
    changes = []
    for item in overrides:
        key, sep, text = item.partition("=")
        keys = tuple(k.strip() for k in key.split("."))
        if not sep or not all(keys):
            raise ValueError(f"override {item!r} is not of the form key=value (or section.key=value)")
        changes.append((item, keys, text))
    task = values.get("task", TrainConfig.task)
    task = next((_parse_value(text, str) for _, keys, text in reversed(changes) if keys == ("task",)), task)
    if isinstance(task, str) and task in TASKS:
        values = _sectioned(values, task)
        moved = set(_option_keys(task))  # older configs' top-level keys of the section
        changes = [(item, (task, *keys) if len(keys) == 1 and keys[0] in moved else keys, text)
                   for item, keys, text in changes]
    for item, keys, text in changes:
        _set(values, keys, _parse_value(text, _hint(keys, task)), item)
    return config_from_dict(values, what)


# ---- comparing configs ----------------------------------------------------------------------------------
# Settings that do not change the training trajectory; a resumed run may change them freely.
RESUMABLE_CHANGES = ("steps", "data_workers", "text2image.model_dtype", "lora.validation_prompts", "lora.output_name",
                     "textual_inversion.validation_prompts", "textual_inversion.save_pt",
                     "textual_inversion.save_diffusers", "hypernetwork.validation_prompts", "hypernetwork.save_pt",
                     "hypernetwork.output_name", "controlnet.validation_prompts", "controlnet.output_name",
                     "log_every", "sample_every", "save_every", "keep_last", "sample_sampler", "sample_steps",
                     "sample_cfg_scale")


def flat_settings(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config (``to_dict``'s, or an older run's flat one) as one level of keys, those of
    the section dotted (``text2image.vae_model``), a missing key at its default: what
    ``config_differences`` compares. Keys of other tasks' sections (older configs list them) are dropped."""
    task = values.get("task", TrainConfig.task)
    shared = {k: v for k, v in defaults(TrainConfig).items() if k != "options"}
    if task not in TASKS:
        return {**shared, **values}
    values = _sectioned(values, task, strict=False)
    section = values.pop(task)
    flat = {**shared, **{k: v for k, v in values.items() if k not in TASKS}}
    flat.update({f"{task}.{k}": v for k, v in {**defaults(TASKS[task].options), **section}.items()})
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore=RESUMABLE_CHANGES) -> list[str]:
    """Human-readable `key: old -> new` lines for the fields that differ (a section's keys dotted).
    A field missing from either (a state saved before the field existed) counts as its default;
    either may be the flat config of a run saved before the sections existed."""
    return field_differences(flat_settings(old), flat_settings(new), ignore)


