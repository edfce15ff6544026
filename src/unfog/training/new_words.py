"""Trained token-embedding rows for new words: what task "textual_inversion" trains alone and task
"lora" trains with its adapters (``lora.new_words``, pivotal tuning). One word's rows, its
initialization and the checks on its name live here, so both tasks use the same code.

The rows reach the text encoder through ``encode_prompt(embeddings=)``, the path inference uses
for a loaded embedding file. Names are matched on CLIP's full-vocabulary ids
(``tokenize_prompt``), so on a model with a closed vocabulary (the embedded "shapes" model's
``SubVocabTokenizer``, where an unknown word is one id) a new word still finds its rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checkpoint.embeddings import Embedding
from ..conditioning import embedding_words
from ..models.tokenizer import SubVocabTokenizer
from ..pipelines.stable_diffusion import ENCODERS, StableDiffusion


class WordVectors(nn.ParameterList):
    """One word's trained rows: ``self[i]`` (n, W_i) fp32 for text encoder i (SDXL: clip_l, clip_g)."""

    def __init__(self, name: str, vectors: list[Tensor]):
        super().__init__([nn.Parameter(v.detach().float().clone()) for v in vectors])
        self.name = name

    def embedding(self, detached: bool = False) -> Embedding:
        """The rows as an embedding (``detached``: copies, for files and the sample grid)."""
        return Embedding(self.name, tuple(v.detach().clone() if detached else v for v in self))


def initial_vectors(pipe: StableDiffusion, words: str, n: int, option: str) -> list[Tensor]:
    """(n, W) per text encoder from the token embeddings of ``words`` (A1111's ``create_embedding``
    spread: vector i is token i * k // n of k); a one-line ValueError naming ``option`` when the
    words give no token, or (closed vocabulary) a word the model does not know."""
    tokenizer = pipe.tokenizer
    ids = tokenizer.encode(words)
    if not ids:
        raise ValueError(f"{option} {words!r} has no tokens; give words such as \"a person\"")
    if isinstance(tokenizer, SubVocabTokenizer) and SubVocabTokenizer.UNKNOWN_ID in ids:
        raise ValueError(f"{option} {words!r}: {', '.join(tokenizer.unknown_words(words))} is not in the model's "
                         f"vocabulary; known words: {', '.join(sorted(known_words(tokenizer)))}")
    pick = torch.tensor([ids[i * len(ids) // n] for i in range(n)])
    encoders = [getattr(pipe, name) for name in ENCODERS[pipe.family]]
    return [enc.embeddings.token_embedding.weight.detach()[pick.to(enc.embeddings.token_embedding.weight.device)]
            .float().cpu() for enc in encoders]


def known_words(tokenizer: SubVocabTokenizer) -> list[str]:
    return [t[: -len("</w>")] for t in tokenizer.vocab if t.endswith("</w>") and t != ",</w>"]


def check_new_words(tokenizer, names: list[str], option: str) -> None:
    """Each name must have tokens, no two may be the same word to the tokenizer, and on a model with
    a closed vocabulary (the shapes model) none may be made only of words the model knows: every
    prompt using such a word would get the trained rows instead of its meaning."""
    try:
        embedding_words([Embedding(name, (torch.zeros(1, 1),)) for name in names], tokenizer)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None
    if isinstance(tokenizer, SubVocabTokenizer):
        for name in names:
            if SubVocabTokenizer.UNKNOWN_ID not in tokenizer.encode(name):
                raise ValueError(f"{option} {name!r} is made of words the model knows; prompts using them would get "
                                 f"the embedding instead: choose a new word, e.g. \"<{name.replace(' ', '-')}>\"")
