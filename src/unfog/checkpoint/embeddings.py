"""Textual-inversion embeddings: every file format people have, read into one ``Embedding``.

An embedding is n learned rows of a text encoder's token-embedding table (Gal et al. 2022),
called by a word in the prompt (``conditioning.py`` puts the rows in). The formats::

    A1111 .pt / .bin          {"string_to_token": {"*": 265}, "string_to_param": {"*": (n, W)},
                               "name", "step", "sd_checkpoint", "sd_checkpoint_name"}; older files
                               hold string_to_param as a ParameterDict (read as a PickledModule)
    .safetensors              {"emb_params": (n, W)} (A1111 / kohya SD 1.x-2.x), or any single tensor;
                              step / sd_checkpoint / sd_checkpoint_name from its metadata (unfog's files)
    SDXL (.safetensors, .pt)  {"clip_l": (n, 768), "clip_g": (n, 1280)} (kohya, A1111, Civitai)
    diffusers                 learned_embeds.safetensors / .bin: {token: (n, W) or (W,)}
    A1111 PNG / WebP          the A1111 .pt dict as JSON (tensors as {"TORCHTENSOR": nested lists}):
                              base64 in a PNG text chunk "sd-ti-embedding", or zlib-compressed and
                              coded into the low 4 bits of two pixel blocks left and right of the
                              image (``_decode_pixel_border``)

Torch pickles go through the non-executing reader (``load_pickle_object``). The name is the file's
stem, as in A1111 (whose .pt files carry a "name" that A1111 ignores), except for images, whose
JSON "name" A1111 uses. ``hash`` is the sha256 of the whole file, as A1111's ``hashes.sha256``;
its first 12 hex digits (``short_hash``) are what A1111 writes in a PNG's ``TI hashes``.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io import load_safetensors, sha256_from
from .pickle_reader import PickledModule, load_pickle_object

PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
IMAGE_SUFFIXES = (".png", ".webp")
EMBEDDING_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, *IMAGE_SUFFIXES)
EXPECTED = ("string_to_param (A1111), clip_l + clip_g (SDXL), or a single tensor (emb_params, diffusers' "
            "{token: tensor}, kohya)")
# The text widths of the official families, for messages: which model an embedding is for.
FAMILY_OF_WIDTHS = {(768,): "SD 1.x (768)", (1024,): "SD 2.x (1024)", (768, 1280): "SDXL (clip_l 768 + clip_g 1280)"}


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding.

    vectors: one (n, W) float32 tensor per text encoder of the model it is for, in the model's
        encoder order: ``(rows,)`` for SD 1.x / 2.x (and one-encoder models of any width),
        ``(clip_l, clip_g)`` for SDXL. Every tensor has the same n.
    hash: sha256 (full hex) of the file; "" for an embedding made in memory.
    step, checkpoint, checkpoint_name: A1111's training step, model hash and model name, if stored.
    """

    name: str
    vectors: tuple[torch.Tensor, ...]
    path: Path | None = None
    hash: str = ""
    step: int | None = None
    checkpoint: str | None = None
    checkpoint_name: str | None = None

    def __post_init__(self) -> None:
        if not self.vectors or any(v.ndim != 2 or v.shape[0] < 1 for v in self.vectors):
            raise ValueError(f"embedding {self.name!r}: each vector set must be (n >= 1, width), got "
                             f"{[tuple(v.shape) for v in self.vectors]}")
        if len({v.shape[0] for v in self.vectors}) != 1:
            raise ValueError(f"embedding {self.name!r}: its text encoders' vector counts differ: "
                             f"{[v.shape[0] for v in self.vectors]}")

    @property
    def n_vectors(self) -> int:
        return self.vectors[0].shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(v.shape[1] for v in self.vectors)

    @property
    def short_hash(self) -> str:
        """The 12 hex digits A1111 writes in ``TI hashes``."""
        return self.hash[:12]

    @property
    def family(self) -> str:
        """The model family its widths fit, in words (for messages)."""
        return FAMILY_OF_WIDTHS.get(self.widths, f"a model with text width {' + '.join(map(str, self.widths))}")

    def for_widths(self, widths: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
        """The rows for text encoders of these widths, or None if it does not fit them. An SDXL
        embedding fits the refiner (bigG alone) with its clip_g rows, as in A1111."""
        if self.widths == tuple(widths):
            return self.vectors
        if len(widths) == 1 and len(self.vectors) == 2 and self.widths[1] == widths[0]:
            return (self.vectors[1],)
        return None


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """The embedding in ``path`` (any format in the module docstring), named ``name`` or as A1111
    names it. Raises ValueError naming the file for a corrupt or truncated file, or one that holds
    no embedding."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise ValueError(f"{path}: not an embedding file extension {path.suffix!r}; accepted: "
                         f"{', '.join(EMBEDDING_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    stored_name = None
    if suffix in IMAGE_SUFFIXES:
        data = _read_image(path)
        stored_name = data.get("name") if isinstance(data.get("name"), str) else None
        meta = data
    elif suffix == ".safetensors":
        data, meta = load_safetensors(path)  # unfog's files keep A1111's step / sd_checkpoint here
    else:
        data = load_pickle_object(path)
        meta = data if isinstance(data, dict) else {}
    vectors = embedding_vectors(data, path)
    with open(path, "rb") as f:
        digest = sha256_from(f)
    step = meta.get("step")
    return Embedding(
        name=name or stored_name or path.stem,
        vectors=vectors,
        path=path,
        hash=digest,
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        checkpoint=_text(meta.get("sd_checkpoint")),
        checkpoint_name=_text(meta.get("sd_checkpoint_name")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def embedding_vectors(data: Any, path: Path | str) -> tuple[torch.Tensor, ...]:
    """The (n, W) rows per text encoder of a file's contents (see the module docstring); ``path``
    names the file (or the embedding in it) in messages. Also reads the embeddings a LoRA file
    bundles (``checkpoint.lora.bundled_embeddings``), which A1111 groups into the same dicts."""
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not an embedding; expected a dict with {EXPECTED}")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if isinstance(params, PickledModule):
            params = (params.state or {}).get("_parameters", {}) if isinstance(params.state, dict) else {}
        tensors = list(params.values()) if isinstance(params, dict) else []
        if len(tensors) != 1 or not isinstance(tensors[0], torch.Tensor):
            raise ValueError(f"{path}: string_to_param must hold exactly one tensor (one embedding per file), "
                             f"got {len(tensors)} entries")
        return (_rows(tensors[0], path, "string_to_param"),)
    if "clip_l" in data and "clip_g" in data:
        return (_rows(data["clip_l"], path, "clip_l"), _rows(data["clip_g"], path, "clip_g"))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        key, tensor = next(iter(tensors.items()))
        return (_rows(tensor, path, str(key)),)
    if tensors:
        raise ValueError(f"{path} holds {len(tensors)} tensors ({', '.join(map(str, list(tensors)[:5]))}); an "
                         f"embedding file holds {EXPECTED}")
    raise ValueError(f"{path} holds no embedding; expected {EXPECTED}")


def _rows(tensor: Any, path: Path | str, key: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"{path}: {key} must be a float tensor, got {type(tensor).__name__}")
    if tensor.ndim == 1:  # diffusers' single-vector files: (W,)
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}; expected (vectors, width)")
    return tensor.detach().to(torch.float32).clone()


# ------------------------------------------------------------------------------------- images


def _read_image(path: Path) -> dict:
    """The A1111 embedding dict hidden in a PNG / WebP: its text chunk, else its pixel border."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.info.get("sd-ti-embedding")
            pixels = None if text is not None else _rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not a readable image (truncated or corrupt?): {err}") from None
    try:
        if text is not None:
            payload = base64.b64decode(text, validate=False)
        else:
            payload = _decode_pixel_border(pixels, path)
        data = json.loads(payload, object_hook=_tensor_hook)
    except (binascii.Error, zlib.error, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as err:
        if isinstance(err, _NoBorder):
            raise ValueError(str(err)) from None
        where = "its sd-ti-embedding text chunk" if text is not None else "the data in its pixel border"
        raise ValueError(f"{path}: {where} is not a readable embedding (corrupt?): {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the embedded data is a {type(data).__name__}; expected A1111's embedding dict")
    return data


class _NoBorder(ValueError):
    pass


def _rgb(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))  # (H, W, 3)


def _tensor_hook(d: dict) -> Any:
    """A1111 writes tensors into JSON as {"TORCHTENSOR": nested lists}."""
    if "TORCHTENSOR" in d:
        return torch.tensor(d["TORCHTENSOR"], dtype=torch.float64)
    return d


def _lcg_nibbles(n: int) -> torch.Tensor:
    """The low 4 bits of A1111's key stream: seed <- (1664525 seed + 1013904223) mod 2^32 from 0,
    each value ``seed mod 255``."""
    out = bytearray(n)
    seed = 0
    for i in range(n):
        seed = (1664525 * seed + 1013904223) & 0xFFFFFFFF
        out[i] = (seed % 255) & 0x0F
    return torch.frombuffer(out, dtype=torch.uint8) if n else torch.zeros(0, dtype=torch.uint8)


def _decode_pixel_border(rgb: torch.Tensor, path: Path) -> bytes:
    """The zlib stream A1111's ``insert_image_data_embed`` coded into an image's border.

    The encoder draws two blocks of h rows x 3 channels: the low nibbles of the compressed bytes
    (row-major, cycled to fill the block) left of the image and the high nibbles right of it, each
    one black column away. In each block the low 4 bits of a channel carry the data XOR the key
    stream (``_lcg_nibbles``); the high 4 bits carry a dot pattern drawn from the vector values,
    decoration only. Decoding: crop the black margin (pixels with no zero channel bound it), keep
    the low 4 bits, find the columns that are then all zero (the separators); the block before the
    first and the block after the last are the two halves."""
    rgb = rgb.to(torch.uint8)
    lit = (rgb > 0).all(dim=2)  # (H, W)
    rows, cols = lit.any(dim=1).nonzero().flatten(), lit.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        raise _NoBorder(f"{path}: an all-black image holds no embedding")
    low = rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F  # (h, w, 3)
    black = (low.sum(dim=(0, 2), dtype=torch.int64) == 0).nonzero().flatten()
    if len(black) < 2:
        raise _NoBorder(f"{path} has no sd-ti-embedding text chunk and no data blocks in its border: not an "
                        "embedding image (A1111 saves them with both)")
    lower, upper = low[:, : black.min()], low[:, black.max() + 1 :]
    if lower.shape != upper.shape or lower.numel() == 0:
        raise _NoBorder(f"{path}: its border blocks differ in size ({tuple(lower.shape)} vs {tuple(upper.shape)}): "
                        "not an A1111 embedding image")
    key = _lcg_nibbles(lower.numel()).view(lower.shape)
    data = ((upper ^ key) << 4) | (lower ^ key)  # (h, w, 3)
    stream = zlib.decompressobj()
    payload = stream.decompress(data.flatten().numpy().tobytes())  # the cycled padding is left over
    if not stream.eof:
        raise zlib.error("the compressed data ends early")
    return payload
