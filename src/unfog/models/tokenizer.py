"""The CLIP tokenizer (Radford et al. 2021): byte-level BPE over a 49,408-token vocabulary.

Every Stable Diffusion text encoder uses this vocabulary; they differ only in padding. The steps
mirror transformers 5.x ``CLIPTokenizer`` (tokenizers backend), our test oracle:

1. ``<|startoftext|>`` / ``<|endoftext|>`` written literally (exact case) in a prompt are split
   out first and become their ids.
2. Each remaining segment is cleaned: Unicode NFC, whitespace runs -> one space, and lowercasing
   character by character (so a final capital sigma becomes "σ", not Python's "ς").
   There is no ftfy and no HTML unescaping: transformers 5 runs neither. The OpenAI and OpenCLIP
   tokenizers run ``ftfy.fix_text`` and ``html.unescape`` twice, so for them "&amp;" is "&" and
   mojibake is repaired; on ordinary text the ids are the same.
3. Pre-tokenization by CLIP's pattern: the special tokens, contractions ('s 't 're 've 'm 'll
   'd), runs of letters, single digits, runs of other non-space characters; whitespace separates
   and is dropped. A special token matched here came from another case ("<|EndOfText|>"), and
   is split as "<|", "endoftext", "|>" (transformers' byte-level pre-tokenizer does this; the
   original CLIP tokenizer would give the special id).
4. Byte-level BPE per piece: its UTF-8 bytes as printable stand-in characters (GPT-2's
   byte-to-unicode table), "</w>" appended to the last one, then the adjacent pair of lowest
   merge rank is merged until no ranked pair is left.
5. ``[BOS] + ids[:max_length - 2] + [EOS]``, padded to ``max_length`` (77) with the end-of-text
   token (SD 1.x, the transformers default) or with 0 (OpenCLIP: SD 2.x, SDXL's second encoder).

Note: diffusers' SD 2.x / SDXL ``tokenizer_2`` folders set ``pad_token`` to "!" (id 0), and
transformers then treats every "!" in a prompt as that special token, giving id 0 where OpenCLIP
gives the BPE tokens of "!". We follow OpenCLIP: "!" is ordinary text.
"""

from __future__ import annotations

import functools
import gzip
import json
import unicodedata
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import regex
import torch

from ..choices import check_choice

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77
# The BPE file lists many more merges than CLIP uses: 49152 - 256 - 2 of them, which with the
# 2 x 256 byte tokens (plain and end-of-word) and the 2 special tokens make 49,408 ids.
NUM_MERGES = 49152 - 256 - 2
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's file, shipped in unfog/weights/

Padding = Literal["eos", "zero"]

_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")
_PIECE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
)


class Tokens(NamedTuple):
    """A tokenized batch: input_ids (B, L) int64; attention_mask (B, L) int64, 1 from BOS to EOS
    and 0 on padding; eos_index (B,) int64, the position of each sequence's EOS token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    eos_index: torch.Tensor


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, as a list indexed by byte value.

    The 188 bytes that are printable Latin-1 characters stand for themselves; the other 68
    (controls, space, soft hyphen...) map to ``chr(256 + k)`` in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return [table[b] for b in range(256)]


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id map: the byte characters (printable ones first), the same with "</w>",
    one token per merge in rank order, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    alphabet = sorted(byte_alphabet())  # printable bytes, then the stand-ins chr(256 + k)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def clean(text: str) -> str:
    """Step 2: NFC, whitespace runs -> " ", lowercase per character (as tokenizers does)."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(ch.lower() for ch in text)


def pre_tokenize(text: str) -> list[str]:
    """Steps 2 and 3, for text free of (exact-case) special tokens: the pieces BPE runs on."""
    pieces: list[str] = []
    for piece in _PIECE.findall(clean(text)):
        if piece in (BOS, EOS):  # from another case ("<|EndOfText|>"), lowercased:
            pieces += ["<|", piece[2:-2], "|>"]  # transformers' byte-level split
        else:
            pieces.append(piece)
    return pieces


class CLIPTokenizer:
    """Prompt -> CLIP token ids. Build with ``from_bpe_file()`` (OpenAI's merges file; the copy
    shipped with unfog by default) or ``from_folder()`` (a diffusers ``tokenizer`` folder)."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.bos_id = self.vocab[BOS]
        self.eos_id = self.vocab[EOS]
        self._alphabet = byte_alphabet()
        self._bpe_cached = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    @classmethod
    def from_bpe_file(cls, path: str | Path | None = None) -> CLIPTokenizer:
        """From ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, also shipped by open_clip)."""
        path = Path(str(resources.files("unfog") / "weights" / BPE_FILE)) if path is None else Path(path)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : 1 + NUM_MERGES]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        return cls(clip_vocabulary(merges), merges)

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """From a folder with ``vocab.json`` (token -> id) and ``merges.txt`` (pairs by rank)."""
        path = Path(path)
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS and without truncation."""
        ids: list[int] = []
        for segment in _SPECIAL.split(text):  # step 1
            if segment in (BOS, EOS):
                ids.append(self.vocab[segment])
            else:
                for piece in pre_tokenize(segment):
                    ids.extend(self._bpe_cached(piece))
        return ids

    def encode_clip(self, text: str) -> list[int]:
        """Ids of ``text`` in CLIP's full vocabulary (textual-inversion names are matched on these,
        whatever ids a model uses); ``from_clip`` turns them into this tokenizer's ids."""
        return self.encode(text)

    def from_clip(self, ids: Sequence[int]) -> list[int]:
        return list(ids)

    def __call__(
        self, texts: str | Sequence[str], pad: Padding = "eos", max_length: int = MAX_LENGTH
    ) -> Tokens:
        """Tokenize a batch: BOS, up to ``max_length - 2`` tokens, EOS, then padding."""
        if pad not in get_args(Padding):
            check_choice("pad", pad, get_args(Padding))
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        pad_id = self.eos_id if pad == "eos" else 0
        input_ids = torch.full((len(texts), max_length), pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)  # (B, L)
        eos_index = torch.zeros(len(texts), dtype=torch.long)  # (B,)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text)[: max_length - 2], self.eos_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            eos_index[row] = len(ids) - 1
        return Tokens(input_ids, attention_mask, eos_index)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Step 4: one pre-token -> its ids (unknown symbols map to EOS, transformers' unk)."""
        symbols = [self._alphabet[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            symbols = _merge(symbols, pair)
        return tuple(self.vocab.get(s, self.eos_id) for s in symbols)


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair``, left to right, by its concatenation."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class SubVocabTokenizer(CLIPTokenizer):
    """CLIP's BPE with its ids renumbered onto a kept subset, for small models trained from scratch.

    A 49,408-row embedding is most of a small text encoder (6.3 M parameters at width 128), and
    a model trained on a closed caption grammar only ever sees a few hundred of those tokens.
    This tokenizer splits text exactly as ``base`` does and then maps each CLIP id to its rank
    in ``kept_ids`` plus one; id 0 stands for every token outside the subset ("unknown"). The
    start/end-of-text tokens are always kept and, being CLIP's two largest ids, stay the two
    largest here, so the encoder's "argmax" pooling still finds the end of text. The kept ids
    are what a model file stores; the BPE itself is the copy shipped with unfog.
    """

    UNKNOWN_ID = 0

    def __init__(self, base: CLIPTokenizer, kept_ids: Sequence[int]):
        # The BPE state (merges, byte alphabet, cache) stays in ``base``; ``encode`` maps its ids.
        self.base = base
        always = {base.bos_id, base.eos_id, base.vocab[",</w>"]}  # the prompt chunker looks up ","
        self.kept_ids = tuple(sorted(set(int(i) for i in kept_ids) | always))
        if self.kept_ids[0] < 0 or self.kept_ids[-1] >= len(base.vocab):
            raise ValueError(f"kept_ids must lie in 0..{len(base.vocab) - 1}")
        self._compact = {clip_id: rank + 1 for rank, clip_id in enumerate(self.kept_ids)}
        self.vocab = {token: self._compact[i] for token, i in base.vocab.items() if i in self._compact}
        self.bos_id, self.eos_id = self._compact[base.bos_id], self._compact[base.eos_id]

    @classmethod
    def from_texts(cls, base: CLIPTokenizer, texts: Sequence[str]) -> SubVocabTokenizer:
        """Keep every token that occurs in ``texts`` (e.g. all captions a data set can produce)."""
        return cls(base, sorted({i for text in texts for i in base.encode(text)}))

    @property
    def vocab_size(self) -> int:
        return len(self.kept_ids) + 1  # + the unknown id

    def encode(self, text: str) -> list[int]:
        return self.from_clip(self.base.encode(text))

    def encode_clip(self, text: str) -> list[int]:
        return self.base.encode(text)

    def from_clip(self, ids: Sequence[int]) -> list[int]:
        return [self._compact.get(i, self.UNKNOWN_ID) for i in ids]

    def unknown_words(self, text: str) -> list[str]:
        """The pre-tokens of ``text`` with at least one token outside the subset."""
        return [piece for segment in _SPECIAL.split(text) if segment not in (BOS, EOS)
                for piece in pre_tokenize(segment)
                if any(i not in self._compact for i in self.base._bpe_cached(piece))]
