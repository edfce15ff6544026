"""The tasks' sections of the training config: one typed, frozen dataclass per task, holding
the fields of that task alone (``TrainConfig.options``; in JSON, the key named after the task)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..checkpoint.hypernetwork import a1111_dropout_structure
from ..diffusion.schedules import check_choice
from ..models.clip_text import CLIPTextConfig
from ..models.vae import TINY_VAE, VAEConfig
from ..nn.hypernetwork import ACTIVATIONS, WEIGHT_INITS, HypernetworkOptions
from ..nn.lora import TRAINABLE
from .typed import check_types, defaults, with_overrides

if TYPE_CHECKING:
    from .config import TrainConfig

# The small text transformer of the text-to-image models we train (the vocabulary comes from the data).
SMALL_TEXT_ENCODER = CLIPTextConfig(width=128, layers=3, heads=4, activation="gelu")


@dataclass(frozen=True)
class TaskOptions:
    """The section of one task (``TASKS[name].options``): fields of that task alone, under the
    config key ``section`` (the task's name)."""

    section: ClassVar[str] = ""

    def __post_init__(self):
        check_types(self, f"{self.section}.")

    def check(self, config: TrainConfig) -> None:
        """Checks that need the shared fields too (e.g. the data the task can train on)."""


def _needs_rgb(config: TrainConfig) -> None:
    if config.data == "digits":
        raise ValueError(f"task {config.task!r} needs RGB data: 'shapes' or an image folder, not 'digits'")


@dataclass(frozen=True)
class PixelOptions(TaskOptions):
    """Task "pixel": a pixel-space U-Net (``model``, ``model_overrides``), class-conditional on
    digits or unconditional on an image folder. It has no options of its own."""

    section: ClassVar[str] = "pixel"

    def check(self, config: TrainConfig) -> None:
        if config.data_workers:
            raise ValueError("data_workers is an option of tasks 'text2image' and 'autoencoder' (the pixel task's "
                             "data sets are in memory); set it to 0")


@dataclass(frozen=True)
class AutoencoderOptions(TaskOptions):
    """Task "autoencoder": stage 1 of a latent model, the KL VAE, with the LDM loss."""

    section: ClassVar[str] = "autoencoder"

    vae_overrides: dict[str, Any] = field(default_factory=dict)  # VAEConfig fields to change from TINY_VAE
    kl_weight: float = 1e-6
    disc_weight: float = 0.0  # > 0: a patch discriminator's hinge loss, from step disc_start
    disc_start: int = 0
    # False: the encoder (and quant_conv) stay frozen and only the decoder trains, from the model
    # given with --init-from: the latents, and so every U-Net trained on them, stay valid, as
    # Stability's ft-EMA / ft-MSE VAEs were made; the scaling factor is kept, not measured again
    train_encoder: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.kl_weight < 0 or self.disc_weight < 0 or self.disc_start < 0:
            raise ValueError("autoencoder.kl_weight, disc_weight and disc_start must be >= 0")
        self.vae_config()  # an unknown field or a bad value fails here, not mid-run

    def vae_config(self) -> VAEConfig:
        return with_overrides(TINY_VAE, self.vae_overrides, "autoencoder.vae_overrides")

    def check(self, config: TrainConfig) -> None:
        _needs_rgb(config)


@dataclass(frozen=True)
class Text2ImageOptions(TaskOptions):
    """Task "text2image": stage 2 of a latent model, a U-Net with cross-attention on a text
    encoder, trained on the latents of a trained autoencoder."""

    section: ClassVar[str] = "text2image"

    # the model.safetensors of an "autoencoder" run (required); "pixel": no autoencoder, the model
    # diffuses the images themselves (the identity first stage, models.vae.PIXEL_SPACE)
    vae_model: str | None = None
    # the text encoder: CLIPTextConfig fields to change from SMALL_TEXT_ENCODER; it trains with the
    # U-Net (as in LDM) unless train_text_encoder is false
    text_encoder: dict[str, Any] = field(default_factory=dict)
    train_text_encoder: bool = True
    # SDXL's micro-conditioning: the U-Net also sees y = [pooled text output, Fourier features of
    # the image's original size, crop top-left and target size] (num_classes="sequential")
    size_conditioning: bool = False
    # on an image folder: aspect-ratio buckets (datasets/buckets.py) of area at most image_size^2
    # and sides multiples of bucket_step; every batch holds images of one bucket
    buckets: bool = False
    bucket_step: int = 64
    model_dtype: str = "fp32"  # precision of the weights in model.safetensors (the states keep fp32)
    # a super-resolution model (pipelines/super_resolution.py): it draws image_size images given the
    # image at this side, noised to a level drawn from the first augmentation_max of the timesteps
    low_res: int | None = None
    augmentation_max: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.low_res is not None and self.vae_model != "pixel":
            raise ValueError("text2image.low_res (a super-resolution model) works in pixel space: set "
                             "text2image.vae_model to \"pixel\"")
        if self.low_res is not None and self.size_conditioning:
            raise ValueError("text2image.low_res and size_conditioning both use the U-Net's vector y (the noise "
                             "level / the sizes): choose one")
        if self.low_res is not None and self.low_res < 4:
            raise ValueError(f"text2image.low_res must be >= 4 pixels, got {self.low_res}")
        if not 0 < self.augmentation_max <= 1:
            raise ValueError(f"text2image.augmentation_max must be in (0, 1], got {self.augmentation_max}")
        if self.vae_model is None:
            raise ValueError("task 'text2image' trains on the latents of an autoencoder: set text2image.vae_model "
                             "to the model.safetensors of an 'autoencoder' run (or to \"pixel\" for pixel space)")
        check_choice("text2image.model_dtype", self.model_dtype, ("fp32", "fp16", "bf16"))
        if self.bucket_step < 1:
            raise ValueError(f"text2image.bucket_step must be >= 1, got {self.bucket_step}")
        with_overrides(SMALL_TEXT_ENCODER, self.text_encoder, "text2image.text_encoder")  # unknown fields fail now

    def text_encoder_config(self, vocab_size: int, eos_token_id: int) -> CLIPTextConfig:
        """SMALL_TEXT_ENCODER for this vocabulary, with ``text_encoder`` applied."""
        base = replace(SMALL_TEXT_ENCODER, vocab_size=vocab_size, eos_token_id=eos_token_id)
        return with_overrides(base, self.text_encoder, "text2image.text_encoder")

    def check(self, config: TrainConfig) -> None:
        _needs_rgb(config)
        if self.low_res is not None and self.low_res >= config.image_size:
            raise ValueError(f"text2image.low_res {self.low_res} must be below image_size {config.image_size}")
        if self.buckets and config.data in ("digits", "shapes"):
            raise ValueError(f"buckets need an image folder of images of many shapes, not {config.data!r}")


@dataclass(frozen=True)
class LoraOptions(TaskOptions):
    """Task "lora": a LoRA (LoCon with ``conv_rank``; LyCORIS' LoHa / LoKr with ``algo``) on a frozen
    model that unfog loads (an SD 1.x / 2.x / SDXL single file or diffusers folder, or an unfog
    text-to-image file); only the adapters train. The model's own noise schedule and prediction type
    are used (``training/lora.py``)."""

    section: ClassVar[str] = "lora"

    base_model: str | None = None  # the model to adapt; None: the embedded "shapes" text-to-image model
    algo: str = "lora"  # LyCORIS' algo: "lora" (LoRA / LoCon), "loha" (Hadamard) or "lokr" (Kronecker)
    rank: int = 8  # kohya's network_dim: attention, feed-forward, proj_in / proj_out, text encoder layers
    alpha: float = 8.0  # kohya's network_alpha: the adapters are scaled by alpha / rank
    conv_rank: int = 0  # > 0: LoCon, also the ResBlocks' and down/up-sampling convolutions at this rank
    conv_alpha: float = 1.0
    text_encoder_lora: bool = False  # adapters on the text encoder(s) too (q/k/v/out_proj, fc1, fc2)
    base_dtype: str = "fp32"  # the frozen model's dtype; the adapters are always fp32
    gradient_checkpointing: bool = False  # recompute the U-Net's blocks in the backward pass
    cache_latents: str = "none"  # "memory" or "disk" (out_dir/latent_cache.safetensors): encode each image once
    caption_dropout: float = 0.0  # probability of training a sample with the empty caption
    shuffle_tags: bool = False  # shuffle a caption's comma-separated tags after the first keep_tokens
    keep_tokens: int = 0
    validation_prompts: list = field(default_factory=list)  # the sample grid's prompts; []: 4 of the captions
    # on an image folder: aspect-ratio buckets as text2image's (area at most image_size^2, sides
    # multiples of bucket_step); every batch holds images of one bucket
    aspect_buckets: bool = False
    aspect_bucket_step: int = 64
    output_name: str = "lora"  # the LoRA file is out_dir/<output_name>.safetensors
    # pivotal tuning: new word -> the words its embedding starts from ({"star": "triangle"}); each
    # word's new_word_vectors rows per text encoder train with the adapters and are bundled into
    # the LoRA file (bundle_emb keys, as A1111 reads them)
    new_words: dict[str, str] = field(default_factory=dict)
    new_word_vectors: int = 1
    # prior preservation (DreamBooth; kohya's reg_data_dir): every step also trains on a batch of
    # prior_data ("shapes": the shapes set without shapes_options' extra concepts; or a captioned
    # image folder) and adds its loss times prior_loss_weight. prior_target "noise": the usual
    # target, as DreamBooth and kohya; "base": the frozen base model's own prediction for the same
    # noisy latents (self-distillation: the adapted model is held to the base on those prompts)
    prior_data: str | None = None
    prior_size: int = 0  # items of prior_data "shapes"; 0: data_size
    prior_batch_size: int = 0  # 0: batch_size
    prior_loss_weight: float = 1.0
    prior_target: str = "noise"

    def __post_init__(self):
        super().__post_init__()
        for word in self.new_words:
            if not word.strip() or any(ch in word for ch in '.,:()[]/\\'):
                raise ValueError(f"lora.new_words: {word!r} must be a prompt word (no . , : ( ) [ ] / \\), the "
                                 "name its embedding gets in the LoRA file")
        if not 1 <= self.new_word_vectors <= 75:
            raise ValueError(f"lora.new_word_vectors must be in 1..75 (a prompt chunk's tokens), got "
                             f"{self.new_word_vectors}")
        for name in ("rank", "conv_rank", "keep_tokens", "prior_size", "prior_batch_size"):
            minimum = 1 if name == "rank" else 0
            if getattr(self, name) < minimum:
                raise ValueError(f"lora.{name} must be >= {minimum}, got {getattr(self, name)}")
        for name in ("alpha", "conv_alpha"):  # kohya reads network_alpha 0 as "alpha = rank": say so, not train at scale 0
            if not getattr(self, name) > 0:
                raise ValueError(f"lora.{name} must be > 0, got {getattr(self, name)} (kohya's alpha 0 means "
                                 f"alpha = rank: write the rank)")
        check_choice("lora.algo", self.algo, TRAINABLE)
        check_choice("lora.base_dtype", self.base_dtype, ("fp32", "bf16", "fp16"))
        check_choice("lora.cache_latents", self.cache_latents, ("none", "memory", "disk"))
        check_choice("lora.prior_target", self.prior_target, ("noise", "base"))
        if not self.prior_loss_weight > 0:
            raise ValueError(f"lora.prior_loss_weight must be > 0, got {self.prior_loss_weight} (leave prior_data "
                             "out to train without prior preservation)")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"lora.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not all(isinstance(p, str) for p in self.validation_prompts):
            raise ValueError(f"lora.validation_prompts must be a list of strings, got {self.validation_prompts!r}")
        if not self.output_name or "/" in self.output_name or "\\" in self.output_name:
            raise ValueError(f"lora.output_name must be a file name without folders, got {self.output_name!r}")

    def check(self, config: TrainConfig) -> None:
        _check_finetune(config, "the caption dropout lora.caption_dropout")
        if self.aspect_buckets and config.data in ("digits", "shapes"):
            raise ValueError(f"lora.aspect_buckets need an image folder of images of many shapes, not {config.data!r}")
        if self.aspect_bucket_step < 8:
            raise ValueError(f"lora.aspect_bucket_step must be >= 8 (the VAE's factor), got {self.aspect_bucket_step}")
        if self.prior_data == "digits":
            raise ValueError("lora.prior_data must be \"shapes\" or a folder of captioned images, not 'digits' "
                             "(no captions)")
        if self.prior_data not in (None, "shapes") and not Path(self.prior_data).is_dir():
            raise ValueError(f"lora.prior_data: {self.prior_data!r} is not a folder (give \"shapes\" or a folder of "
                             "captioned images)")


def _check_finetune(config: TrainConfig, instead: str) -> None:
    """The shared fields a fine-tuning task (``finetune.py``) can train with; ``instead`` names
    the task's own option in place of ``cond_dropout``, for the message."""
    task = config.task
    _needs_rgb(config)
    if config.options.cache_latents != "none" and not config.center_crop:
        raise ValueError(f"{task}.cache_latents needs center_crop true: random crops change every step")
    unused = [k for k in ("model", "model_overrides", "cond_dropout") if getattr(config, k) != defaults(type(config))[k]]
    if unused:
        raise ValueError(f"task {task!r} does not read {', '.join(unused)} (the model is {task}.base_model, "
                         f"{instead}); leave them out")


# Built-in template sets of task "textual_inversion" (A1111's textual_inversion_templates idea, our
# wording): [name] is the embedding's name, [filewords] the image's caption.
TI_TEMPLATES: dict[str, tuple[str, ...]] = {
    "subject": ("a picture of a [name]", "an image of a [name]", "a drawing of a [name]", "a photo of a [name]",
                "a close-up picture of a [name]", "a [name]"),
    "subject_filewords": ("a picture of a [name], [filewords]", "an image of a [name], [filewords]",
                          "a photo of a [name], [filewords]", "a [name], [filewords]"),
    "style": ("a picture in the style of [name]", "an image in the style of [name]",
              "a drawing in the style of [name]", "a painting in the style of [name]"),
    "style_filewords": ("[filewords], in the style of [name]", "a picture of [filewords], in the style of [name]",
                        "an image of [filewords], by [name]"),
    "filewords": ("[filewords]",),  # captions that call the name themselves
}


@dataclass(frozen=True)
class TextualInversionOptions(TaskOptions):
    """Task "textual_inversion": new token-embedding rows for the word ``name`` on a frozen model
    that unfog loads (as task "lora"'s); only the vectors train (``training/textual_inversion.py``)."""

    section: ClassVar[str] = "textual_inversion"

    base_model: str | None = None  # the model; None: the embedded "shapes" text-to-image model
    name: str = ""  # the word prompts call the embedding by; the file is out_dir/<name>.safetensors
    init_words: str = "*"  # the vectors start as these words' token embeddings (A1111's initialization text)
    num_vectors: int = 1  # rows per text encoder
    # a built-in set of TI_TEMPLATES or a text file of templates, one a line, each with [name]
    # ([filewords]: the image's caption); each sample draws one
    templates: str = "subject"
    base_dtype: str = "fp32"  # the frozen model's dtype; the vectors are always fp32
    cache_latents: str = "none"  # "memory" or "disk" (out_dir/latent_cache.safetensors)
    validation_prompts: list = field(default_factory=list)  # [name] is replaced; []: 4 training prompts
    save_pt: bool = False  # also out_dir/<name>.pt, A1111's .pt layout
    save_diffusers: bool = False  # also out_dir/learned_embeds.safetensors, diffusers' {name: (n, W)} (SD 1.x / 2.x)

    def __post_init__(self):
        super().__post_init__()
        if not self.name.strip():
            raise ValueError("textual_inversion.name is required: the word prompts will call the embedding by, "
                             "e.g. \"<sks>\" (the file is out_dir/<name>.safetensors)")
        if any(ch in self.name for ch in '/\\:,()[]'):
            raise ValueError(f"textual_inversion.name {self.name!r} must be one prompt word and a file name: no / \\ "
                             ": , ( ) [ ]")
        if not 1 <= self.num_vectors <= 75:
            raise ValueError(f"textual_inversion.num_vectors must be in 1..75 (a prompt chunk's tokens), got "
                             f"{self.num_vectors}")
        check_choice("textual_inversion.base_dtype", self.base_dtype, ("fp32", "bf16", "fp16"))
        check_choice("textual_inversion.cache_latents", self.cache_latents, ("none", "memory", "disk"))
        if not all(isinstance(p, str) for p in self.validation_prompts):
            raise ValueError(f"textual_inversion.validation_prompts must be a list of strings, got "
                             f"{self.validation_prompts!r}")
        self.template_list()  # a missing file or a template without [name] fails here, not mid-run

    def template_list(self) -> tuple[str, ...]:
        """The templates: a built-in set, else the lines of the file ``templates`` (blank lines skipped)."""
        if self.templates in TI_TEMPLATES:
            return TI_TEMPLATES[self.templates]
        path = Path(self.templates)
        if not path.is_file():
            raise ValueError(f"textual_inversion.templates {self.templates!r} is neither a built-in set "
                             f"({', '.join(TI_TEMPLATES)}) nor a file of templates")
        found = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not found:
            raise ValueError(f"textual_inversion.templates: {path} holds no templates (one a line, each with [name])")
        missing = [t for t in found if "[name]" not in t]
        if missing:
            raise ValueError(f"textual_inversion.templates: {path}: {len(missing)} template(s) without [name], e.g. "
                             f"{missing[0]!r}; the embedding trains only through prompts that call it")
        return found

    def check(self, config: TrainConfig) -> None:
        _check_finetune(config, "no caption dropout: the templates make the prompts")


@dataclass(frozen=True)
class HypernetworkTrainingOptions(TaskOptions):
    """Task "hypernetwork": a hypernetwork (A1111's module pairs that transform attention's k / v
    context) on a frozen model that unfog loads (as task "lora"'s); only the hypernetwork's
    parameters train (``training/hypernetwork.py``). The module options carry A1111's file keys'
    names and its UI's defaults; their layout rules are ``nn/hypernetwork.py``'s. (Not called
    ``HypernetworkOptions``: that is the modules' shape in ``nn/hypernetwork.py``.)"""

    section: ClassVar[str] = "hypernetwork"

    base_model: str | None = None  # the model; None: the embedded "shapes" text-to-image model
    output_name: str = "hypernetwork"  # the file is out_dir/<output_name>.safetensors, and its name
    layer_structure: list = field(default_factory=lambda: [1, 2, 1])  # widths as multiples of C
    activation_func: str = "linear"  # a name of nn.hypernetwork.ACTIVATIONS
    is_layer_norm: bool = False  # a LayerNorm after each Linear
    weight_initialization: str = "Normal"  # Normal, XavierUniform, XavierNormal, KaimingUniform, KaimingNormal
    use_dropout: bool = False
    # dropout probability after Linear i at entry i + 1 (first and last 0); []: A1111's derived
    # structure (0.3 after each hidden Linear but the last, which gets it with last_layer_dropout)
    dropout_structure: list = field(default_factory=list)
    last_layer_dropout: bool = False
    activate_output: bool = False  # the activation after the last Linear too
    # the context widths that get a module pair; []: every width the U-Net's attention layers
    # see (their self-attention widths and the text context's), which must include the context's
    enable_sizes: list = field(default_factory=list)
    base_dtype: str = "fp32"  # the frozen model's dtype; the hypernetwork is always fp32
    cache_latents: str = "none"  # "memory" or "disk" (out_dir/latent_cache.safetensors)
    validation_prompts: list = field(default_factory=list)  # the sample grid's prompts; []: 4 of the captions
    save_pt: bool = False  # also out_dir/<output_name>.pt, A1111's .pt layout

    def __post_init__(self):
        super().__post_init__()
        if not self.output_name or any(ch in self.output_name for ch in "/\\"):
            raise ValueError(f"hypernetwork.output_name must be a file name without folders, got {self.output_name!r}")
        check_choice("hypernetwork.activation_func", self.activation_func, tuple(ACTIVATIONS))
        check_choice("hypernetwork.weight_initialization", self.weight_initialization, WEIGHT_INITS)
        check_choice("hypernetwork.base_dtype", self.base_dtype, ("fp32", "bf16", "fp16"))
        check_choice("hypernetwork.cache_latents", self.cache_latents, ("none", "memory", "disk"))
        for name in ("layer_structure", "dropout_structure"):
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in getattr(self, name)):
                raise ValueError(f"hypernetwork.{name} must be a list of numbers, got {getattr(self, name)!r}")
        if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in self.enable_sizes):
            raise ValueError(f"hypernetwork.enable_sizes must be a list of context widths, got {self.enable_sizes!r}")
        ds, n = self.dropout_structure, len(self.layer_structure)
        if ds and not self.use_dropout:
            raise ValueError("hypernetwork.dropout_structure is set but use_dropout is false; set use_dropout true "
                             "or leave dropout_structure out")
        if ds and self.last_layer_dropout:
            raise ValueError("hypernetwork.last_layer_dropout is read only when dropout_structure is left out (a "
                             "given structure states the last layer's dropout itself)")
        if ds and (len(ds) != n or ds[0] != 0 or ds[-1] != 0):
            raise ValueError(f"hypernetwork.dropout_structure needs {n} probabilities (one per entry of "
                             f"layer_structure {self.layer_structure}), the first and last 0, got {ds}")
        if not all(isinstance(p, str) for p in self.validation_prompts):
            raise ValueError(f"hypernetwork.validation_prompts must be a list of strings, got "
                             f"{self.validation_prompts!r}")
        try:
            self.module_options()
        except ValueError as err:
            raise ValueError(f"hypernetwork: {err}") from None

    def module_options(self) -> HypernetworkOptions:
        """The shape of the modules, with A1111's dropout structure when none is given."""
        layers = [float(x) for x in self.layer_structure]
        dropout = self.dropout_structure or (a1111_dropout_structure(layers, self.use_dropout, self.last_layer_dropout)
                                             if len(layers) >= 2 else [])
        return HypernetworkOptions(layer_structure=tuple(layers), activation=self.activation_func,
                                   layer_norm=self.is_layer_norm, dropout_structure=tuple(dropout),
                                   activate_output=self.activate_output, weight_init=self.weight_initialization)

    def check(self, config: TrainConfig) -> None:
        _check_finetune(config, "no caption dropout")


@dataclass(frozen=True)
class ControlNetTrainingOptions(TaskOptions):
    """Task "controlnet": a ControlNet (Zhang et al. 2023) for a frozen model that unfog loads (as
    task "lora"'s), trained on (image, hint, caption) triples (``training/controlnet_data.py``): the
    encoder copied from the model's U-Net, the zero convolutions and the hint encoder's last conv
    at zero; only the ControlNet trains (``training/controlnet.py``). The paper's learning rate is
    1e-5 (``lr``, a shared field: set it)."""

    section: ClassVar[str] = "controlnet"

    base_model: str | None = None  # the model; None: the embedded "shapes" text-to-image model
    output_name: str = "controlnet"  # the file is out_dir/<output_name>.safetensors
    # probability of training a sample with the empty prompt; the paper drops 50 % of the prompts so
    # that the ControlNet learns to read the hint alone
    caption_dropout: float = 0.0
    base_dtype: str = "fp32"  # the frozen model's dtype; the ControlNet is always fp32
    validation_prompts: list = field(default_factory=list)  # the grid's prompts, with the first items' hints

    @property
    def cache_latents(self) -> str:
        return "none"  # each step loads the hints with their images

    def __post_init__(self):
        super().__post_init__()
        if not self.output_name or any(ch in self.output_name for ch in "/\\"):
            raise ValueError(f"controlnet.output_name must be a file name without folders, got {self.output_name!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"controlnet.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_choice("controlnet.base_dtype", self.base_dtype, ("fp32", "bf16", "fp16"))
        if not all(isinstance(p, str) for p in self.validation_prompts):
            raise ValueError(f"controlnet.validation_prompts must be a list of strings, got {self.validation_prompts!r}")

    def check(self, config: TrainConfig) -> None:
        _check_finetune(config, "the caption dropout controlnet.caption_dropout")
