"""Prompts -> the U-Net's conditioning: cross-attention context, and SDXL's vector ``y``.

The prompt language is AUTOMATIC1111's (``unfog.prompt_parser``): emphasis weights, ``BREAK``, and
prompts of any length, cut into chunks of 75 tokens. Each chunk becomes ``[BOS] + ids + [EOS]``
padded to 77 by the encoder's convention, every chunk is encoded on its own, and the chunk
outputs are concatenated along the sequence axis: K chunks give a context of 77 * K tokens. The
negative prompt is chunked too, and whichever of prompt / negative prompt has fewer chunks is
given empty ones (the chunk of ""), so the two contexts have the same length.

What each family reads from its text encoder(s) (``READOUTS``)::

    family        encoder(s)                  layer (CLIP skip)        final norm  padding
    sd1           CLIP ViT-L                  last (1)                 yes         EOS
    sd2           OpenCLIP ViT-H              penultimate (2)          yes         0
    sdxl          CLIP ViT-L + OpenCLIP bigG  penultimate (2), each    no          EOS / 0
    sdxl_refiner  OpenCLIP bigG               penultimate (2)          no          0

SDXL concatenates the two encoders' states along the feature axis (768 + 1280 = 2048) and takes
bigG's projected pooled output (``text_embeds``) of the FIRST chunk as ``pooled``.
``with_pooled=True`` gives ``pooled`` for the other families too, from their (last) encoder
(``pooled_output``): unfog's own text-to-image models trained with ``size_conditioning`` build
SDXL's vector ``y`` from it while encoding prompts as "sd1".

CLIP skip. ``clip_skip=N`` means A1111's "CLIP skip": the states of ``hidden_states[-N]``, so 1
is the last layer and 2 the penultimate (then ``final_layer_norm`` for the families that use it);
it replaces the family's layer for every encoder. diffusers counts from the family's default
instead: its ``clip_skip=k`` is our ``k + 1`` for SD 1.x (``hidden_states[-(k + 1)]``) and our
``k + 2`` for SDXL (``hidden_states[-(k + 2)]``); its ``None`` is our default. CLIP skip counts
from the end of the network as trained (``CLIPTextConfig.depth``), not from the end of the module:
diffusers' SD 2.x ``text_encoder`` folders keep 23 of ViT-H's 24 layers (``trained_layers=24``),
and ``clip_skip=2`` reads their last layer, the very layer it reads from a 24-layer single file.

Emphasis (``Emphasis``), as A1111's options: "original" multiplies each token's states by its
weight, then rescales the chunk so its mean is what it was (``z = z * w; z = z * old_mean /
new_mean``); "no_norm" only multiplies; "ignore" parses the syntax but applies no weights; "none"
reads the prompt as plain text. The mean is taken per prompt and chunk (A1111 takes it over the
batch of prompts, which is the same when the batch repeats one prompt) and per encoder (SDXL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import torch

from unfog.choices import check_choice
from unfog.models.clip_text import CLIPTextEncoder, CLIPTextOutput
from unfog.models.tokenizer import CLIPTokenizer, Padding
from unfog.nn.embeddings import timestep_embedding
from unfog.prompt_parser import CHUNK_LENGTH, Chunk, Word, tokenize_prompt

if TYPE_CHECKING:
    from unfog.checkpoint.embeddings import Embedding

# Which text encoders a pipeline has and how it reads them (READOUTS). Not ``checkpoint.Family``,
# which describes a checkpoint's layout (its configs and key prefixes).
EncoderFamily = Literal["sd1", "sd2", "sdxl", "sdxl_refiner"]
Emphasis = Literal["original", "no_norm", "ignore", "none"]

SIZE_EMBED_DIM = 256  # SDXL: Fourier features per size / crop / aesthetic-score value


@dataclass(frozen=True)
class Readout:
    """How one text encoder's output becomes context.

    clip_skip: read the output of layer ``depth + 1 - clip_skip`` of the trained network (1 = last
        layer, A1111's CLIP skip): ``hidden_states[-clip_skip]`` of a whole encoder.
    final_norm: pass those states through the encoder's ``final_layer_norm``.
    pad: how a chunk is padded after its EOS ("eos" or "zero", see ``CLIPTokenizer``).
    pooled: this encoder supplies ``pooled`` (``pooled_output``: its projected pooled output
        ``text_embeds``, or the pooled state itself when it has no projection).
    """

    clip_skip: int
    final_norm: bool
    pad: Padding
    pooled: bool = False


READOUTS: dict[str, tuple[Readout, ...]] = {
    "sd1": (Readout(1, final_norm=True, pad="eos"),),
    "sd2": (Readout(2, final_norm=True, pad="zero"),),
    "sdxl": (Readout(2, final_norm=False, pad="eos"), Readout(2, final_norm=False, pad="zero", pooled=True)),
    "sdxl_refiner": (Readout(2, final_norm=False, pad="zero", pooled=True),),
}


class PromptEmbeddings(NamedTuple):
    """context: (B, 77 * K, C); pooled: (B, P) for the SDXL families, else None."""

    context: torch.Tensor
    pooled: torch.Tensor | None


class Conditioning(NamedTuple):
    """Both halves of classifier-free guidance; the contexts have the same length (B, 77 * K, C)."""

    context: torch.Tensor
    negative_context: torch.Tensor
    pooled: torch.Tensor | None
    negative_pooled: torch.Tensor | None


def encode_prompt(
    family: EncoderFamily,
    encoders: Sequence[CLIPTextEncoder],
    tokenizer: CLIPTokenizer,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    *,
    clip_skip: int | None = None,
    emphasis: Emphasis = "original",
    zero_empty_negative: bool | None = None,
    with_pooled: bool = False,
    embeddings: Sequence[Embedding] = (),
) -> Conditioning:
    """Prompt(s) and negative prompt(s) -> ``Conditioning`` for ``family``.

    encoders: the family's text encoders in order (SDXL: CLIP-L, then bigG with its projection).
    negative_prompt: one string for the whole batch, or one per prompt.
    zero_empty_negative: when every negative prompt is "", use zeros for the negative context
        and pooled output instead of encoding "". Default: on for the SDXL families (A1111 does
        this for SDXL; diffusers' SDXL base does it when no negative prompt is given).
    with_pooled: fill ``pooled`` for "sd1" / "sd2" too (the SDXL families always have it).
    embeddings: textual-inversion embeddings: each one's name written in a prompt or negative
        prompt is replaced by its n vectors in the token-embedding rows (``embedding_words``;
        the rows go in after BOS, before the position embeddings, as in A1111).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("need at least one prompt")
    if isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts (give 1, or 1 each)")
    if zero_empty_negative is None:
        zero_empty_negative = family in ("sdxl", "sdxl_refiner")
    parse = check_choice("emphasis", emphasis, get_args(Emphasis)) != "none"
    words = embedding_words(embeddings, tokenizer)
    chunks = [tokenize_prompt(p, tokenizer, parse_emphasis=parse, words=words) for p in prompts]
    negative_chunks = [tokenize_prompt(p, tokenizer, parse_emphasis=parse, words=words) for p in negatives]
    n_chunks = max(len(c) for c in chunks + negative_chunks)
    args = dict(clip_skip=clip_skip, emphasis=emphasis, n_chunks=n_chunks, with_pooled=with_pooled,
                embeddings=embeddings)
    cond = encode_chunked(family, encoders, tokenizer, chunks, **args)
    if zero_empty_negative and all(p == "" for p in negatives):
        uncond = PromptEmbeddings(*(None if t is None else torch.zeros_like(t) for t in cond))
    else:
        uncond = encode_chunked(family, encoders, tokenizer, negative_chunks, **args)
    return Conditioning(cond.context, uncond.context, cond.pooled, uncond.pooled)


def encode_chunked(
    family: EncoderFamily,
    encoders: Sequence[CLIPTextEncoder],
    tokenizer: CLIPTokenizer,
    chunks: Sequence[Sequence[Chunk]],
    *,
    clip_skip: int | None = None,
    emphasis: Emphasis = "original",
    n_chunks: int | None = None,
    with_pooled: bool = False,
    embeddings: Sequence[Embedding] = (),
) -> PromptEmbeddings:
    """Chunked prompts (``prompt_parser.tokenize_prompt``) -> ``PromptEmbeddings``, each prompt
    given empty chunks up to ``n_chunks`` (default: the most any prompt has). ``with_pooled``:
    the last encoder supplies ``pooled`` whatever the family (see ``encode_prompt``).
    ``embeddings``: those whose names the chunks' ``fixes`` hold."""
    readouts = _readouts(family, encoders, clip_skip)
    rows = embedding_rows(embeddings, encoders)
    if with_pooled:
        last = encoders[-1].config
        if last.layers < last.depth:
            raise ValueError(f"with_pooled needs the pooled output of a whole text encoder; this one keeps only "
                             f"{last.layers} of its {last.depth} layers")
        readouts = (*readouts[:-1], replace(readouts[-1], pooled=True))
    n_chunks = max(len(c) for c in chunks) if n_chunks is None else n_chunks
    contexts, pooled = [], None
    for i, (encoder, readout) in enumerate(zip(encoders, readouts)):
        ids, weights = chunk_tensors(chunks, n_chunks, tokenizer, readout.pad)
        device = encoder.embeddings.token_embedding.weight.device
        fixes = [(b * n_chunks + k, 1 + at, rows[name][i]) for b, prompt_chunks in enumerate(chunks)
                 for k, chunk in enumerate(prompt_chunks) for at, name in chunk.fixes]  # position 0 is BOS
        context, first_pooled = encode_chunks(encoder, ids.to(device), weights.to(device), readout, emphasis, fixes)
        contexts.append(context)
        if readout.pooled:
            pooled = first_pooled
    return PromptEmbeddings(torch.cat(contexts, dim=-1), pooled)  # (B, 77 * K, sum of widths)


def chunk_tensors(
    chunks: Sequence[Sequence[Chunk]], n_chunks: int, tokenizer: CLIPTokenizer, pad: Padding
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of B prompts -> ids (B, K, 77) int64 and weights (B, K, 77) float32, K = n_chunks.

    Each row is ``[BOS] + ids + [EOS]`` then padding (the EOS token, or 0); BOS, EOS and padding
    weigh 1. Prompts with fewer than K chunks get empty chunks (those of "")."""
    if any(len(c) > n_chunks for c in chunks):
        raise ValueError(f"a prompt has more than n_chunks={n_chunks} chunks")
    length = CHUNK_LENGTH + 2
    pad_id = tokenizer.eos_id if pad == "eos" else 0
    ids = torch.full((len(chunks), n_chunks, length), pad_id, dtype=torch.long)  # (B, K, 77)
    ids[:, :, 0] = tokenizer.bos_id
    ids[:, :, 1] = tokenizer.eos_id  # the EOS of empty chunks; others are overwritten below
    weights = torch.ones(len(chunks), n_chunks, length)  # (B, K, 77)
    for b, prompt_chunks in enumerate(chunks):
        for k, chunk in enumerate(prompt_chunks):
            n = len(chunk.ids)
            if n > CHUNK_LENGTH or len(chunk.weights) != n:
                raise ValueError(
                    f"a chunk holds {n} ids and {len(chunk.weights)} weights; need equal counts, at most "
                    f"{CHUNK_LENGTH}"
                )
            ids[b, k, 1 : n + 1] = torch.tensor(chunk.ids, dtype=torch.long)
            ids[b, k, n + 1] = tokenizer.eos_id
            weights[b, k, 1 : n + 1] = torch.tensor(chunk.weights, dtype=torch.float32)
    return ids, weights


def encode_chunks(
    encoder: CLIPTextEncoder, ids: torch.Tensor, weights: torch.Tensor, readout: Readout, emphasis: Emphasis,
    fixes: Sequence[tuple[int, int, torch.Tensor]] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids, weights (B, K, 77) -> context (B, 77 * K, W) and the first chunk's ``pooled_output``
    (B, P). Chunks are encoded independently. ``fixes``: (chunk b * K + k, position, rows (n, W)):
    the token-embedding rows from that position on are replaced by ``rows`` (textual inversion;
    gradients reach ``rows``)."""
    b, k, length = ids.shape
    flat = ids.reshape(b * k, length)
    inputs_embeds = None
    if fixes:
        inputs_embeds = encoder.embeddings.token_embedding(flat)  # (B * K, 77, W), a fresh tensor
        for chunk, at, rows in fixes:
            inputs_embeds[chunk, at : at + rows.shape[0]] = rows.to(inputs_embeds)
    out = encoder(flat, inputs_embeds=inputs_embeds)
    z = out.hidden_states[encoder.config.depth + 1 - readout.clip_skip]  # (B * K, 77, W); [0] = embeddings
    if readout.final_norm:
        z = encoder.final_layer_norm(z)
    z = apply_emphasis(z, weights.reshape(b * k, length), emphasis)
    first_pooled = pooled_output(out).reshape(b, k, -1)[:, 0]  # (B, P)
    return z.reshape(b, k * length, z.shape[-1]), first_pooled


def embedding_words(embeddings: Sequence[Embedding], tokenizer: CLIPTokenizer) -> dict[tuple[int, ...], Word]:
    """Embeddings by the CLIP ids of their names, what ``tokenize_prompt`` matches. Two names with
    the same ids (they differ only in case or spacing) are refused: the prompt could not say which."""
    words: dict[tuple[int, ...], Word] = {}
    for e in embeddings:
        ids = tuple(tokenizer.encode_clip(e.name))
        if not ids:
            raise ValueError(f"embedding name {e.name!r} has no tokens; give it a name with letters or digits")
        if ids in words:
            raise ValueError(f"embeddings {words[ids].name!r} and {e.name!r} are the same word to the tokenizer "
                             "(names match case-insensitively); keep one")
        words[ids] = Word(e.name, e.n_vectors)
    return words


def embedding_rows(embeddings: Sequence[Embedding], encoders: Sequence[CLIPTextEncoder]) -> dict[str, tuple]:
    """name -> its rows for each of ``encoders``; an embedding for other text widths is refused."""
    widths = tuple(e.config.width for e in encoders)
    rows = {}
    for e in embeddings:
        fitted = e.for_widths(widths)
        if fitted is None:
            raise ValueError(f"embedding {e.name!r} is for {e.family}; this model's text encoders are "
                             f"{' + '.join(map(str, widths))} wide")
        rows[e.name] = fitted
    return rows


def used_embeddings(texts: Sequence[str], tokenizer: CLIPTokenizer, embeddings: Sequence[Embedding],
                    emphasis: Emphasis = "original") -> list[Embedding]:
    """The embeddings whose names occur in ``texts``, in order of first use (for ``TI hashes``)."""
    words = embedding_words(embeddings, tokenizer)
    parse = emphasis != "none"
    names = [name for t in texts for chunk in tokenize_prompt(t, tokenizer, parse_emphasis=parse, words=words)
             for _, name in chunk.fixes]
    by_name = {e.name: e for e in embeddings}
    return [by_name[n] for n in dict.fromkeys(names)]


def pooled_output(out: CLIPTextOutput) -> torch.Tensor:
    """The pooled output a vector conditioning reads: ``text_embeds`` (B, P) when the encoder has a
    projection, else the final-normed end-of-text state ``pooled`` (B, W)."""
    return out.pooled if out.text_embeds is None else out.text_embeds


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, emphasis: Emphasis) -> torch.Tensor:
    """z (N, L, W) token states of N chunks, weights (N, L) -> the weighted states (see module
    docstring). "original": ``z * w``, rescaled so each chunk keeps its mean over (L, W)."""
    plain = (weights == 1).all(dim=-1)  # (N,) chunks without emphasis, whose states stay as they are
    if check_choice("emphasis", emphasis, get_args(Emphasis)) in ("ignore", "none") or plain.all():
        return z
    weighted = z * weights.to(z.dtype)[..., None]  # (N, L, W)
    if emphasis == "no_norm":
        return weighted
    acc = torch.promote_types(z.dtype, torch.float32)  # fp16 / bf16 states: means in fp32
    old_mean = z.mean(dim=(1, 2), keepdim=True, dtype=acc)  # (N, 1, 1)
    new_mean = weighted.mean(dim=(1, 2), keepdim=True, dtype=acc)
    # A chunk without emphasis keeps its states (the rescale is m / m = 1, but its gradient, when a
    # text encoder trains through it, is rounding error over m, huge for a near-zero-mean state);
    # so does a chunk whose weighted mean is exactly 0 (emphasis that cancels): 0 / 0.
    keep = plain[:, None, None] | (new_mean == 0)
    ratio = torch.where(keep, torch.ones_like(new_mean), old_mean / new_mean)
    return weighted * ratio.to(z.dtype)


Pair = tuple[int, int] | torch.Tensor  # one (a, b) for the whole batch, or a (B, 2) tensor of one per sample


def sdxl_vector_cond(pooled: torch.Tensor, original_size: Pair, crop_coords: Pair, target_size: Pair) -> torch.Tensor:
    """SDXL base's ``y`` (B, P + 6 * 256): the pooled bigG output, then the sinusoidal embedding
    (``timestep_embedding``, 256 features) of each of original (height, width), crop (top,
    left) and target (height, width). For the official model P = 1280 and y is 2816 wide.

    pooled: (B, P). The values are those of diffusers' ``add_time_ids``, in its order. Each pair
    is one tuple for the whole batch (inference) or a (B, 2) tensor, one row per sample
    (training on images of many sizes)."""
    return _with_fourier(pooled, [original_size, crop_coords, target_size])


def sdxl_refiner_vector_cond(
    pooled: torch.Tensor,
    original_size: tuple[int, int],
    crop_coords: tuple[int, int],
    aesthetic_score: float,
) -> torch.Tensor:
    """The SDXL refiner's ``y`` (B, P + 5 * 256), 2560 wide for the official model: pooled, then
    the embeddings of original (height, width), crop (top, left) and the aesthetic score (A1111
    and diffusers use 6.0 for the prompt and 2.5 for the negative prompt)."""
    return _with_fourier(pooled, [original_size, crop_coords, (aesthetic_score,)])


def _with_fourier(pooled: torch.Tensor, groups: list) -> torch.Tensor:
    """[pooled, Fourier features of every value]: each group is a tuple of numbers for the whole
    batch or a (B, k) tensor of one row per sample."""
    if pooled.ndim != 2:
        raise ValueError(f"pooled must be (batch, features), got shape {tuple(pooled.shape)}")
    b = pooled.shape[0]
    rows = [torch.as_tensor(g, dtype=torch.float32).to(pooled.device) for g in groups]
    rows = [r.reshape(1, -1) if r.ndim < 2 else r for r in rows]  # (1, k) or (B, k)
    if any(r.ndim != 2 or r.shape[0] not in (1, b) for r in rows):
        raise ValueError(f"sizes must be pairs or (batch, 2) tensors for a batch of {b}, got shapes "
                         f"{[tuple(torch.as_tensor(g).shape) for g in groups]}")
    n_rows = max(r.shape[0] for r in rows)  # 1 when the values are the whole batch's
    v = torch.cat([r.expand(n_rows, -1) for r in rows], dim=1)  # (1 | B, n)
    emb = timestep_embedding(v.flatten(), SIZE_EMBED_DIM).reshape(v.shape[0], -1)  # (1 | B, n * 256)
    return torch.cat([pooled, emb.to(pooled.dtype).expand(b, -1)], dim=-1)


def _readouts(family: str, encoders: Sequence[CLIPTextEncoder], clip_skip: int | None) -> tuple[Readout, ...]:
    if family not in READOUTS:
        check_choice("family", family, tuple(READOUTS))
    readouts = READOUTS[family]
    if len(encoders) != len(readouts):
        raise ValueError(f"family {family!r} takes {len(readouts)} text encoder(s), got {len(encoders)}")
    if clip_skip is not None:
        readouts = tuple(replace(r, clip_skip=clip_skip) for r in readouts)
    for i, (encoder, readout) in enumerate(zip(encoders, readouts)):
        depth, kept = encoder.config.depth, encoder.config.layers
        if not 1 <= readout.clip_skip <= depth:
            raise ValueError(
                f"clip_skip must be between 1 (last layer) and {depth} (the encoder's layers), got {readout.clip_skip}"
            )
        if readout.clip_skip < depth - kept + 1:
            raise ValueError(
                f"clip_skip {readout.clip_skip} reads layer {depth + 1 - readout.clip_skip} of {depth}, but this "
                f"text encoder keeps only its first {kept} (as diffusers' SD 2.x text_encoder folders do); "
                f"use clip_skip >= {depth - kept + 1}"
            )
        if readout.pooled and encoder.text_projection is None:
            raise ValueError(f"family {family!r} needs a text projection (projection_dim) on encoder {i}")
        if readout.pooled and kept < depth:
            raise ValueError(f"family {family!r} needs the pooled output of encoder {i}, which keeps only "
                             f"{kept} of its {depth} layers")
    return readouts
