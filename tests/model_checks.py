"""Helpers shared by the model tests: official checkpoint layouts, random weights, relative error,
and the CLIP tokenizer folder built from OpenAI's BPE file. Needs only torch (the oracles that need
diffusers or transformers are in ``tests/parity/oracles.py``).

Import with ``sys.path.insert(0, <tests dir>)`` then ``from model_checks import ...``.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch

LAYOUTS = Path(__file__).resolve().parents[1].parent / "shared/fixtures/checkpoint-layouts"
BPE_FILE = Path(__file__).resolve().parents[1] / "src/unfog/weights/bpe_simple_vocab_16e6.txt.gz"


def read_layout(name: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a fixture file of ``name [d0,d1,...]`` lines (``[]`` = scalar)."""
    layout = {}
    for line in (LAYOUTS / f"{name}.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split()
            dims = shape.strip("[]")
            layout[key] = tuple(int(d) for d in dims.split(",")) if dims else ()
    return layout


def layout_mismatch(model: torch.nn.Module, name: str) -> str:
    """"" when ``model``'s state_dict has exactly the names and shapes of layout ``name``, else a
    message listing a few missing and unexpected entries."""
    ours = {(k, tuple(v.shape)) for k, v in model.state_dict().items()}
    official = set(read_layout(name).items())
    missing, unexpected = sorted(official - ours), sorted(ours - official)
    if not missing and not unexpected:
        return ""
    return (
        f"{name}: {len(missing)} missing, e.g. {missing[:5]}; "
        f"{len(unexpected)} unexpected, e.g. {unexpected[:5]}"
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (including the zero-initialised ones) a random, well-scaled value:
    matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
    return model


def randomize_meta_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A model built on the meta device, given empty CPU storage and filled in place, one parameter
    at a time, with ``randomize_``'s distribution (without its temporary copies: for full-size
    models). In eval mode."""
    model.to_empty(device="cpu")
    assert not list(model.buffers()), "buffers would be left uninitialised by to_empty"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max()).item()


def write_tokenizer_folder(folder: Path) -> Path:
    """A diffusers-style ``tokenizer`` folder (``vocab.json`` + ``merges.txt``) for transformers'
    ``CLIPTokenizer``, written from OpenAI's BPE file by OpenAI CLIP's vocabulary construction
    (independently of our tokenizer): the 256 byte characters, each with "</w>", the first 48,894
    merges joined, then the two special tokens (49,408 entries)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
    return folder
