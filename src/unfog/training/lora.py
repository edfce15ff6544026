"""Task "lora": a LoRA (Hu et al. 2021; LoCon with ``conv_rank``; LyCORIS' LoHa or LoKr with
``algo``) trained on a frozen model that unfog loads: an official SD 1.x / 2.x / SDXL single file
or diffusers folder, or an unfog text-to-image file (the embedded "shapes" model by default). Only
the adapters train. The model loading, data, latent cache, loss and sample grid are the fine-tuning
tasks' (``finetune.py``).

Targets, as kohya's ``networks/lora.py``: in the U-Net every Linear and 1x1 conv inside the
transformer blocks (attention q/k/v/out, feed-forward, proj_in / proj_out) at ``rank``; with
``conv_rank`` (LoCon) also the ResBlocks' and down/up-sampling blocks' layers, 3x3 convs at
``conv_rank`` and the rest at ``rank``; with ``text_encoder_lora`` the text encoders'
q/k/v/out_proj and fc1/fc2.

With ``new_words`` (pivotal tuning, as in Replicate's and diffusers' advanced SDXL trainers): each
new word also gets token-embedding rows (``new_words.WordVectors``, started from its initializer
words as textual inversion starts them), trained with the adapters by the same optimiser, put into
the captions through ``encode_prompt(embeddings=)`` and bundled into the LoRA file as A1111 reads
them (``bundle_emb`` keys), so ``pipe.load_lora`` makes the words usable. On a model with a closed
vocabulary (the shapes model) a new word is otherwise its one unknown token; the rows give each
new word a vector of its own for the adapters to work with.

The frozen models never enter the module the optimiser, EMA and DDP see (``LoraNetwork``): its
parameters and state dict are the adapters (and the new words' rows) alone, so states are small
and the EMA copies only them. Its forward binds its adapters into the frozen models' ``TrainableLayer`` wrappers and runs
them, so the EMA's copy, bound the same way, is the EMA model (the sample grid draws with it).
"""

from __future__ import annotations

import copy
import math
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.embeddings import Embedding
from ..checkpoint.lora import LoraFile, ModuleIndex, Target, check_family, kohya_metadata, read_lora, save_lora
from ..datasets.shapes_text import ShapesConfig
from ..models.clip_text import CLIPAttention, CLIPMLP
from ..nn.blocks import Downsample, ResBlock, SpatialTransformer, Upsample
from ..nn.lora import AdapterWeights, TrainableLayer, add_lora
from ..pipelines.stable_diffusion import ENCODERS, StableDiffusion
from .sections import LoraOptions
from .typed import field_differences
from .data import CaptionedImages
from .finetune import FineTuneTrainer, frozen_forward
from .lora_data import cache_latents, make_lora_data, transform_captions
from .new_words import WordVectors, check_new_words, initial_vectors

UNET_BLOCKS = (SpatialTransformer,)
CONV_BLOCKS = (ResBlock, Downsample, Upsample)  # LoCon
TEXT_BLOCKS = (CLIPAttention, CLIPMLP)
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

    def base_forward(self, x: Tensor, t: Tensor, prompts: list[str], sizes: Tensor | None = None) -> Tensor:
        """The base model's U-Net output, every adapter switched off (multiplier 0) for the pass:
        prior preservation's teacher (``lora.prior_target`` "base")."""
        multipliers = {key: layer.multiplier for key, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.multiplier = 0.0
        try:
            return frozen_forward(self.pipe, x, t, prompts, sizes, text_grad=False)
        finally:
            for key, layer in self.layers.items():
                layer.multiplier = multipliers[key]


class LoraNetwork(nn.Module):
    """The adapters (``adapters``: key "component/dotted/path" -> factors), the new words' rows
    (``words``, one ``WordVectors`` each) and a forward that runs the frozen model with them:
    (x_t, t, prompts, per-sample sizes) -> the U-Net's output."""

    def __init__(self, adapters: nn.ModuleDict, frozen: Frozen, words: nn.ModuleList | None = None):
        super().__init__()
        self.adapters = adapters
        self.words = words if words is not None else nn.ModuleList()
        self.frozen = frozen

    def __deepcopy__(self, memo) -> "LoraNetwork":
        # the frozen model is shared
        twin = LoraNetwork(copy.deepcopy(self.adapters, memo), self.frozen, copy.deepcopy(self.words, memo))
        return twin.train(self.training)

    def embeddings(self, detached: bool = False) -> list[Embedding]:
        return [w.embedding(detached) for w in self.words]

    def bind(self) -> None:
        """Make the frozen model's TrainableLayers use these adapters."""
        for key, layer in self.frozen.layers.items():
            for name in layer.factor_names:
                setattr(layer, name, getattr(self.adapters[key], name))

    def forward(self, x: Tensor, t: Tensor, prompts: list[str], sizes: Tensor | None = None) -> Tensor:
        self.bind()
        out = frozen_forward(self.frozen.pipe, x, t, prompts, sizes, embeddings=self.embeddings(),
                             text_grad=self.frozen.train_text_encoder or len(self.words) > 0)
        if len(self.words):  # a batch without a new word still gives its rows a (zero) gradient, as DDP needs
            out = out + 0 * sum(v.sum() for v in self.words.parameters())
        return out

    def adapter_weights(self) -> dict[Target, AdapterWeights]:
        """The adapters as a LoRA file stores them, on their targets."""
        layers = self.frozen.layers
        return {self.frozen.targets[key]: layers[key].adapter_weights(a) for key, a in self.adapters.items()}


class LoraTrainer(FineTuneTrainer):
    options: LoraOptions

    def build(self) -> None:
        super().build()
        self.prior, self.prior_latents = self._prior_data(), None
        if self.prior is not None and self.options.cache_latents != "none":
            path = Path(self.config.out_dir) / "prior_latent_cache.safetensors"
            self.prior_latents = cache_latents(self.prior, self.pipe.vae, self.device,
                                               path if self.options.cache_latents == "disk" else None,
                                               progress=self.world.is_main)

    def _prior_data(self) -> CaptionedImages | None:
        """``lora.prior_data``: "shapes" without the extra concepts and with every category equally
        often whatever the training data's ``weights`` (it stands for what the model already knows;
        another seed than the training data's), or a captioned folder (no aspect buckets); None
        without prior preservation."""
        c, o = self.config, self.options
        if o.prior_data is None:
            return None
        shapes = c.shapes_config() if c.data == "shapes" else None
        if o.prior_data == "shapes":
            shapes = replace(shapes or ShapesConfig(), extra_shapes=(), extra_colors=(), extra_fraction=0.0,
                             weights=None)
        return make_lora_data(o.prior_data, c.image_size, o.prior_size or c.data_size, c.seed + 1, True,
                              bucket_step=None, min_bucket=1, shapes_config=shapes, workers=c.data_workers)

    def compute_loss(self, idx: Tensor, model: nn.Module) -> Tensor:
        """The diffusion loss, plus with ``lora.prior_data`` ``prior_loss_weight`` times that of a
        batch of the prior data drawn at random (its target ``prior_target``'s)."""
        loss = super().compute_loss(idx, model)
        if self.prior is None:
            return loss
        o = self.options
        prior_idx = torch.randint(len(self.prior), (o.prior_batch_size or self.config.batch_size,),
                                  generator=self.noise_gen)
        teacher = self.net.frozen.base_forward if o.prior_target == "base" else None
        return loss + o.prior_loss_weight * self.batch_loss(prior_idx, model, self.prior, self.prior_latents, teacher)

    def make_network(self) -> LoraNetwork:
        words = self._new_words()  # from the token table as loaded, before base_dtype casts it
        net = LoraNetwork(*self._add_adapters(), words)
        if self.options.gradient_checkpointing:
            self.pipe.unet.config = replace(self.pipe.unet.config, gradient_checkpointing=True)
        return net

    def bucket_step(self) -> int | None:
        return self.options.aspect_bucket_step if self.options.aspect_buckets else None

    def _add_adapters(self) -> tuple[nn.ModuleDict, Frozen]:
        """Freeze the models, wrap the default targets in ``lora.algo``'s TrainableLayers (fp32
        adapters; seeded), then cast the frozen weights to ``base_dtype``."""
        c, o, pipe = self.config, self.options, self.pipe
        components = ["unet"] + (list(ENCODERS[pipe.family]) if o.text_encoder_lora else [])
        self.freeze()
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
        self.cast_frozen({id(p) for p in adapters.parameters()})
        return adapters, Frozen(pipe, layers, targets, o.text_encoder_lora)

    def _new_words(self) -> nn.ModuleList:
        """The rows of ``lora.new_words``, each started from its initializer words' token embeddings."""
        o, pipe = self.options, self.pipe
        check_new_words(pipe.tokenizer, list(o.new_words), "lora.new_words")
        return nn.ModuleList([WordVectors(word, initial_vectors(pipe, init, o.new_word_vectors,
                                                                f"lora.new_words[{word!r}]"))
                              for word, init in o.new_words.items()])

    def prompt_draws(self, b: int, g: torch.Generator) -> tuple[Tensor | None, ...]:
        o = self.options
        drop = torch.rand(b, generator=g) < o.caption_dropout
        shuffle = torch.randint(0, 2**62, (b,), generator=g) if o.shuffle_tags else None
        return drop, shuffle

    def make_prompts(self, captions: list[str], draws: tuple[Tensor | None, ...]) -> list[str]:
        drop, shuffle = draws
        return transform_captions(captions, drop, shuffle, self.options.keep_tokens)

    @contextmanager
    def applied(self):
        self.ema.model.bind()  # the EMA adapters in the frozen model, the EMA rows in the pipeline
        for e in self.ema.model.embeddings(detached=True):
            self.pipe.add_embedding(e)
        try:
            yield
        finally:
            self.net.bind()
            self.pipe.unload_embeddings()

    def describe(self) -> str:
        words = f" with new words {', '.join(self.options.new_words)}" if self.options.new_words else ""
        return f"LoRA {self.options.output_name}{words}"

    @property
    def model_path(self) -> Path:
        return Path(self.config.out_dir) / f"{self.options.output_name}.safetensors"

    def metadata(self) -> dict[str, str]:
        """kohya's ``ss_*`` and ``modelspec.*`` fields of this run's LoRA file, at the current step."""
        c, o, pipe = self.config, self.options, self.pipe
        extra = {"ss_sd_model_name": self.base_path.name, "ss_num_train_images": str(len(self.data)),
                 "ss_max_train_steps": str(c.steps), "ss_steps": str(self.step), "ss_learning_rate": str(c.lr),
                 "ss_seed": str(c.seed), "ss_network_train_unet_only": str(not o.text_encoder_lora)}
        if self.prior is not None:
            extra |= {"ss_num_reg_images": str(len(self.prior)), "ss_prior_loss_weight": str(o.prior_loss_weight)}
        return kohya_metadata(pipe.family, rank=o.rank, alpha=o.alpha, output_name=o.output_name,
                              started_at=self.started_at, prediction=pipe.prediction,
                              conv_rank=o.conv_rank or None, conv_alpha=o.conv_alpha if o.conv_rank else None,
                              resolution=c.image_size, algo=o.algo, extra=extra)

    def save_model(self) -> None:
        """The EMA adapters as a kohya LoRA file, ``out_dir/<output_name>.safetensors`` (ours to
        replace: ``build`` refused a file of that name that is not from this run)."""
        pipe = self.pipe
        save_lora(self.model_path, self.ema.model.adapter_weights(), pipe.family, self.metadata(),
                  unet_config=pipe.unet.config, overwrite=True, embeddings=self.ema.model.embeddings(detached=True))

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
        for ``resumes.jsonl``.

        Its bundled embeddings continue the ``lora.new_words`` of the same names (same number of
        vectors); a new word the file lacks starts from its initializer words (noted), and a bundled
        embedding that is no new word of this config is refused, so that no saved file loses it."""
        frozen, lora = self.net.frozen, read_lora(path)
        found = self._fitting_adapters(lora)
        rows = self._fitting_words(lora)
        with torch.no_grad():
            for word, theirs in zip(self.net.words, rows):
                for mine, row in zip(word, theirs or ()):
                    mine.copy_(row)
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
        fresh = [w.name for w, r in zip(self.net.words, rows) if r is None]
        if fresh:
            changes.append(f"lora.new_words {', '.join(fresh)} are not bundled in {lora.path.name} and start from "
                           "their initializer words")
            if self.world.is_main:
                print(f"note: {changes[-1]}", file=sys.stderr)
        recorded = {k: str(lora.metadata[k]) for k in RECORDED if k in lora.metadata}
        return changes + field_differences(recorded, {k: self.metadata()[k] for k in recorded})

    def _fitting_words(self, lora: LoraFile) -> list[tuple[Tensor, ...] | None]:
        """The file's rows for each new word (None: not bundled), checked as ``load_weights`` says."""
        o, pipe = self.options, self.pipe
        extra = sorted(set(lora.embeddings) - set(o.new_words))
        if extra:
            raise ValueError(f"{lora.path} bundles the embeddings {', '.join(extra)}, which are not in lora.new_words; "
                             "add them (word -> initializer words) to continue them")
        widths = tuple(getattr(pipe, name).config.width for name in ENCODERS[pipe.family])
        out = []
        for word in o.new_words:
            e = lora.embeddings.get(word)
            rows = None if e is None else e.for_widths(widths)
            if e is not None and (rows is None or e.n_vectors != o.new_word_vectors):
                raise ValueError(f"{lora.path}: its bundled embedding {word} holds {e.n_vectors} vectors for {e.family}; "
                                 f"this run trains lora.new_word_vectors={o.new_word_vectors} for text widths "
                                 f"{' + '.join(map(str, widths))}")
            out.append(rows)
        return out

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
