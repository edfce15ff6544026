"""Task "textual_inversion": new token-embedding rows for one word (Gal et al. 2022), trained on a
frozen model that unfog loads (the fine-tuning tasks' base, ``finetune.py``).

The vectors are the only trained tensors: one (num_vectors, W) fp32 Parameter per text encoder
(SDXL: clip_l and clip_g), put into the prompt through the one conditioner
(``encode_prompt(embeddings=)``, after BOS and before the position embeddings, exactly as
inference puts a loaded file in). The token-embedding table is never written to: A1111 appends
the vectors as rows of the table and restores every other row after each step; here they never
enter it, so every weight of the model stays bit for bit as loaded.

Initialization, as A1111's ``create_embedding``: the model's token embeddings of ``init_words``
(k tokens), vector i taking token ``i * k // num_vectors`` (repeated when k < n, thinned when
k > n). Each sample's prompt is a template drawn from the noise generator, with [name] replaced
by the name and [filewords] by the image's caption.

Files, ``out_dir/<name>.*`` (the file's stem is the name A1111 and ``read_embedding`` use):
``.safetensors`` {"emb_params": (n, W)} (SDXL: {"clip_l", "clip_g"}) with A1111's name / step /
sd_checkpoint (the first 10 hex digits of the base file's sha256) / sd_checkpoint_name as
metadata; with ``save_pt`` A1111's ``.pt`` dict; with ``save_diffusers`` diffusers'
``learned_embeds.safetensors`` {name: (n, W)} (diffusers reads the SDXL file itself).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.embeddings import Embedding, read_embedding
from ..checkpoint.io import atomic_write, save_safetensors
from ..pipelines.stable_diffusion import ENCODERS, StableDiffusion
from .sections import TextualInversionOptions
from .finetune import FineTuneTrainer, frozen_forward
from .new_words import WordVectors, check_new_words, initial_vectors

A1111_TOKEN = 265  # A1111 writes string_to_token {"*": 265}, CLIP's id of "*"


class EmbeddingNetwork(nn.Module):
    """The trained vectors (``vectors[i]``: (n, W_i) for text encoder i) and a forward that runs the
    frozen model with them: (x_t, t, prompts, per-sample sizes) -> the U-Net's output."""

    def __init__(self, name: str, vectors: list[Tensor], pipe: StableDiffusion):
        super().__init__()
        self.name, self.pipe = name, pipe  # the pipeline is no module: never copied, saved or optimised
        self.vectors = WordVectors(name, vectors)

    def __deepcopy__(self, memo) -> "EmbeddingNetwork":
        twin = EmbeddingNetwork(self.name, [copy.deepcopy(v.data, memo) for v in self.vectors], self.pipe)
        return twin.train(self.training)

    def embedding(self, detached: bool = False) -> Embedding:
        return self.vectors.embedding(detached)

    def forward(self, x: Tensor, t: Tensor, prompts: list[str], sizes: Tensor | None = None) -> Tensor:
        return frozen_forward(self.pipe, x, t, prompts, sizes, text_grad=True, embeddings=[self.embedding()])


class TextualInversionTrainer(FineTuneTrainer):
    options: TextualInversionOptions
    output_option = "name"

    def make_network(self) -> EmbeddingNetwork:
        o, pipe = self.options, self.pipe
        if o.save_diffusers and pipe.family == "sdxl":
            raise ValueError("textual_inversion.save_diffusers: diffusers loads SDXL embeddings from the clip_l / "
                             "clip_g file this task writes anyway (load_textual_inversion per text encoder); set it "
                             "to false")
        self.templates = o.template_list()
        self.freeze()
        vectors = initial_vectors(pipe, o.init_words, o.num_vectors, "textual_inversion.init_words")
        net = EmbeddingNetwork(o.name, vectors, pipe)
        check_new_words(pipe.tokenizer, [o.name], "textual_inversion.name")
        self.cast_frozen(set())
        return net

    def prompt_draws(self, b: int, g: torch.Generator) -> tuple[Tensor | None, ...]:
        return (torch.randint(len(self.templates), (b,), generator=g),)

    def make_prompts(self, captions: list[str], draws: tuple[Tensor | None, ...]) -> list[str]:
        return [self.fill(self.templates[int(k)], caption) for k, caption in zip(draws[0], captions)]

    def fill(self, template: str, caption: str = "") -> str:
        return template.replace("[name]", self.options.name).replace("[filewords]", caption)

    def default_prompts(self) -> list[str]:
        """Up to 4 distinct training prompts: the templates in turn, with the first captions."""
        prompts = []
        for i in range(min(len(self.data), 16)):
            prompt = self.fill(self.templates[i % len(self.templates)], self.data.caption_of(i))
            if prompt not in prompts:
                prompts.append(prompt)
            if len(prompts) == 4:
                break
        return prompts

    def validation_prompts(self) -> list[str]:
        return [self.fill(p) for p in self.options.validation_prompts] or self.default_prompts()

    @contextmanager
    def applied(self):
        self.pipe.add_embedding(self.ema.model.embedding(detached=True))
        try:
            yield
        finally:
            self.pipe.unload_embeddings()

    def describe(self) -> str:
        return f"embedding {self.options.name} ({self.options.num_vectors} vectors)"

    # ---- files --------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return Path(self.config.out_dir) / f"{self.options.name}.safetensors"

    def output_paths(self) -> list[Path]:
        out, o = Path(self.config.out_dir), self.options
        return [self.model_path] + ([out / f"{o.name}.pt"] if o.save_pt else []) + \
            ([out / "learned_embeds.safetensors"] if o.save_diffusers else [])

    def file_tensors(self) -> dict[str, Tensor]:
        """The EMA vectors as A1111 / kohya store them: emb_params, or clip_l and clip_g."""
        vectors = [v.detach().float().cpu().contiguous() for v in self.ema.model.vectors]
        return {"emb_params": vectors[0]} if len(vectors) == 1 else {"clip_l": vectors[0], "clip_g": vectors[1]}

    def save_model(self) -> None:
        """The EMA embedding in every requested format (ours to replace: ``build`` refused files of
        these names that are not from this run)."""
        o = self.options
        meta = {"name": o.name, "step": self.step, "sd_checkpoint": self.checkpoint_hash(),
                "sd_checkpoint_name": self.base_path.stem}
        tensors = self.file_tensors()
        save_safetensors(self.model_path, tensors, {**meta, "format": "unfog-textual-inversion"})
        if o.save_pt:
            body = {"string_to_token": {"*": A1111_TOKEN}, "string_to_param": {"*": tensors["emb_params"]}} \
                if "emb_params" in tensors else dict(tensors)
            atomic_write(self.model_path.with_suffix(".pt"), lambda tmp: torch.save({**body, **meta}, tmp))
        if o.save_diffusers:
            save_safetensors(self.model_path.parent / "learned_embeds.safetensors", {o.name: tensors["emb_params"]}, {})

    def load_weights(self, path: Path) -> list[str]:
        """Continue an embedding file (``--init-from``; any format ``read_embedding`` reads): its
        vectors become the trained ones and the EMA's; the optimizer, LR schedule and step start afresh."""
        e = read_embedding(path)
        encoders = [getattr(self.pipe, name) for name in ENCODERS[self.pipe.family]]
        widths = tuple(enc.config.width for enc in encoders)
        rows = e.for_widths(widths)
        if rows is None or e.n_vectors != self.options.num_vectors:
            raise ValueError(f"{path} holds {e.n_vectors} vectors for {e.family}; this run trains "
                             f"textual_inversion.num_vectors={self.options.num_vectors} for text widths "
                             f"{' + '.join(map(str, widths))}")
        with torch.no_grad():
            for mine, theirs in zip(self.net.vectors, rows):
                mine.copy_(theirs)
        self.ema.model.load_state_dict(self.net.state_dict())
        return [f"embedding {e.name} at step {e.step}" if e.step is not None else f"embedding {e.name}"]
