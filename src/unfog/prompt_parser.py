"""AUTOMATIC1111's prompt syntax: emphasis weights, ``BREAK``, and the split into 75-token chunks.

This is the de-facto standard prompt language of Stable Diffusion front ends (stable-diffusion-
webui ``modules/prompt_parser.py`` and ``modules/sd_hijack_clip.py``); we reproduce its results,
including its quirks, except where noted.

Emphasis syntax (``parse_prompt_attention``)::

    (text)          weight x 1.1          ((text)) x 1.21, and so on
    [text]          weight x (1 / 1.1)
    (text:1.3)      weight x 1.3          the number may be surrounded by spaces: "( text : 1.3 )"
    \\( \\) \\[ \\] \\\\  a literal "(", ")", "[", "]", "\\"; a lone "\\" before anything else is dropped
    BREAK           (the word, upper case) ends the current 75-token chunk

Brackets left open apply to the rest of the prompt; a closing bracket with nothing open is literal
text. Weights multiply in the order the brackets close (as A1111 does, so the floats agree bit
for bit: "(((house:1.3))" gives 1.3 * 1.1 * 1.1 = 1.5730000000000004). Adjacent pieces of equal
weight are merged.

Where we differ from A1111, on purpose:

* ``BREAK`` always starts a new chunk. A1111 marks it with the weight -1, which brackets around it
  then scale ("(a BREAK b)" gives -1.1), after which it is no longer recognised and the word
  "break" is encoded with a negative weight.
* A weight that is not a number ("(a:1.2.3)") is read as text ("a:1.2.3" at x 1.1); A1111 raises
  ``ValueError`` from ``float()``.

Chunking (``chunk_tokens``): token ids are put in chunks of 75 (BOS and EOS make 77 for the
encoder). When a chunk fills up, the tokens after its last comma move to the next chunk if that
comma is within the last 20 tokens (A1111's "comma padding backtrack", default 20).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from unfog.models.tokenizer import CLIPTokenizer

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS the encoder sees 77
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`
ROUND = 1.1  # "(text)"
SQUARE = 1 / 1.1  # "[text]"; a multiplication by this constant, as in A1111 (not a division)


class Segment(NamedTuple):
    """A piece of prompt text and the factor its token states are multiplied by."""

    text: str
    weight: float


BREAK = Segment("BREAK", -1.0)  # the chunk break marker (A1111's representation)

# One lexical token per match; exactly one named group is set.
_LEXER = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])                             # \( \) \[ \] \\  -> literal character
    | (?P<backslash>\\)                                     # any other backslash: dropped
    | (?P<open>[(\[])                                       # ( or [
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)         # ":1.3)" closes a ( with a weight
    | (?P<close>[)\]])                                      # ) or ]
    | (?P<text>[^\\()\[\]:]+|:)                             # a run of plain text, or a lone colon
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(prompt: str) -> list[Segment]:
    """Prompt with emphasis syntax -> segments of (text, weight), ``BREAK`` markers in between.

    >>> [tuple(s) for s in parse_prompt_attention("an (important) word [ok]")]
    [('an ', 1.0), ('important', 1.1), (' word ', 1.0), ('ok', 0.9090909090909091)]
    """
    segments: list[list] = []  # [text, weight] pairs, or the BREAK marker (never scaled)
    open_round: list[int] = []  # index into `segments` where each open "(" began
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for seg in segments[start:]:
            if seg is not BREAK:
                seg[1] *= factor

    for m in _LEXER.finditer(prompt):
        kind, value = m.lastgroup, m.group(m.lastgroup)
        if kind == "escaped":
            segments.append([value, 1.0])
        elif kind == "open":
            (open_round if value == "(" else open_square).append(len(segments))
        elif kind == "weight" and open_round:
            scale_from(open_round.pop(), float(value))
        elif kind == "close" and value == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif kind == "close" and value == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        elif kind != "backslash":  # text, or a close / weight with nothing open: literal text
            for i, part in enumerate(_BREAK_WORD.split(m.group(0))):
                if i > 0:
                    segments.append(BREAK)
                segments.append([part, 1.0])

    for start in open_round:  # unclosed brackets reach to the end, outermost first
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)
    return _merge_equal_weights(segments) if segments else [Segment("", 1.0)]


def _merge_equal_weights(segments: list) -> list[Segment]:
    merged: list[Segment] = []
    for seg in segments:
        if seg is BREAK:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1].weight == seg[1]:
            merged[-1] = Segment(merged[-1].text + seg[0], seg[1])
        else:
            merged.append(Segment(seg[0], seg[1]))
    return merged


class Chunk(NamedTuple):
    """Up to ``CHUNK_LENGTH`` prompt token ids (no BOS / EOS / padding) and their weights.
    ``fixes``: (offset in ``ids``, name) of each textual-inversion embedding the chunk holds; its
    n positions hold the id 0 as placeholders, as in A1111, and get the embedding's rows."""

    ids: list[int]
    weights: list[float]
    fixes: tuple[tuple[int, str], ...] = ()


class Word(NamedTuple):
    """A textual-inversion embedding as the chunker sees it: its name and number of vectors."""

    name: str
    length: int


def chunk_tokens(
    pieces: Sequence[tuple[Sequence[int | Word], float] | Segment],
    comma_id: int,
    chunk_length: int = CHUNK_LENGTH,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[Chunk]:
    """Weighted token runs -> chunks of at most ``chunk_length`` tokens, as A1111's
    ``tokenize_line``. ``pieces`` holds (ids, weight) pairs and ``BREAK`` markers.

    A full chunk is closed before the next token is added; if that token is not a comma and the
    chunk's last comma lies within its last ``comma_backtrack`` tokens, the tokens after the comma
    start the next chunk instead (0 disables this). ``BREAK`` closes the current chunk even when
    it is empty. An empty prompt gives one empty chunk. A ``Word`` in a run (an embedding) takes
    its n positions in one chunk: if they do not fit in the current one, it starts the next, as
    A1111 does (after the comma backtrack a token at a full chunk would have caused). Tokens the
    backtrack moves take their embeddings along (A1111 leaves those behind, writing their rows
    over the old chunk's padding).
    """
    if chunk_length < 1 or comma_backtrack < 0:
        raise ValueError(
            f"need chunk_length >= 1 and comma_backtrack >= 0, got {chunk_length} and {comma_backtrack}"
        )
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1  # index in `ids` of the current chunk's last comma

    def close_chunk() -> None:
        nonlocal ids, weights, fixes, last_comma
        chunks.append(Chunk(ids, weights, tuple(fixes)))
        ids, weights, fixes, last_comma = [], [], [], -1

    for piece in pieces:
        if piece == BREAK:
            close_chunk()
            continue
        run, weight = piece
        for token in run:
            word = token if isinstance(token, Word) else None
            if word is None and token == comma_id:
                last_comma = len(ids)
            elif (
                comma_backtrack
                and len(ids) == chunk_length
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                keep = last_comma + 1
                moved = ids[keep:], weights[keep:], [(at - keep, name) for at, name in fixes if at >= keep]
                ids, weights, fixes = ids[:keep], weights[:keep], [f for f in fixes if f[0] < keep]
                close_chunk()
                ids, weights, fixes = moved
            if len(ids) == chunk_length:
                close_chunk()
            if word is None:
                ids.append(token)
                weights.append(weight)
                continue
            if word.length > chunk_length:
                raise ValueError(f"embedding {word.name!r} has {word.length} vectors; a prompt chunk holds at most "
                                 f"{chunk_length}")
            if len(ids) + word.length > chunk_length:  # never split: the whole embedding starts the next chunk
                close_chunk()
            fixes.append((len(ids), word.name))
            ids += [0] * word.length
            weights += [weight] * word.length
    if ids or not chunks:
        close_chunk()
    return chunks


def tokenize_prompt(prompt: str, tokenizer: CLIPTokenizer, *, parse_emphasis: bool = True,
                    words: Mapping[tuple[int, ...], Word] | None = None) -> list[Chunk]:
    """A prompt -> its chunks of token ids and weights. With ``parse_emphasis`` False the prompt
    is plain text (brackets are ordinary characters, no ``BREAK``), all weights 1.

    Each segment is tokenized on its own, as A1111 does, so "(red)car" gives the tokens of "red"
    and "car", not of "redcar".

    ``words``: textual-inversion embeddings by the CLIP ids of their names (``encode_clip``). As
    in A1111, a run of a segment's ids equal to a name's ids (the longest match first) becomes
    the embedding: matching is on CLIP's full vocabulary for every tokenizer, so a small model's
    ``SubVocabTokenizer``, where a new name's pieces are unknown (id 0), still finds it. A name is
    thus found case-insensitively and wherever CLIP's pre-tokenizer splits it off ("a,my-style").
    A multi-vector embedding never splits across chunks (``chunk_tokens``)."""
    segments = parse_prompt_attention(prompt) if parse_emphasis else [Segment(prompt, 1.0)]
    by_first: dict[int, list[tuple[tuple[int, ...], Word]]] = {}
    for ids, word in sorted((words or {}).items(), key=lambda item: -len(item[0])):
        by_first.setdefault(ids[0], []).append((ids, word))
    pieces = [seg if seg == BREAK else (_with_words(seg.text, tokenizer, by_first), seg.weight) for seg in segments]
    return chunk_tokens(pieces, comma_id=tokenizer.vocab[",</w>"])


def _with_words(text: str, tokenizer: CLIPTokenizer, by_first: dict) -> list:
    """The model ids of ``text``, with a ``Word`` in place of each embedding name's ids."""
    if not by_first:
        return tokenizer.encode(text)
    clip = tokenizer.encode_clip(text)
    out: list = []
    plain: list[int] = []
    i = 0
    while i < len(clip):
        match = next((w for ids, w in by_first.get(clip[i], ()) if tuple(clip[i : i + len(ids)]) == ids), None)
        if match is None:
            plain.append(clip[i])
            i += 1
            continue
        out += tokenizer.from_clip(plain) + [match]
        plain = []
        i += len(next(ids for ids, w in by_first[clip[i]] if w is match))
    return out + tokenizer.from_clip(plain)
