"""Every textual-inversion file format, built here from its published layout (torch.save,
safetensors, PIL), read by ``unfog.checkpoint.embeddings.read_embedding``; and bad files.

The pixel-border PNG comes from an encoder written in this test from A1111's published algorithm
(``modules/textual_inversion/image_embedding.py``: zlib, nibbles, LCG key stream, black separator
columns), independent of our decoder."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from unfog.checkpoint.embeddings import Embedding, read_embedding


def vec(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_dict(v: torch.Tensor, name: str = "stored-name") -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": name, "step": 1500,
            "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a1111_pt(tmp_path):
    v = vec(3, 768)
    path = tmp_path / "my-style.pt"
    torch.save(a1111_dict(v), path)
    e = read_embedding(path)
    assert e.name == "my-style"  # the stem, as A1111 (it ignores the stored name for .pt files)
    assert len(e.vectors) == 1 and torch.equal(e.vectors[0], v)
    assert (e.step, e.checkpoint, e.checkpoint_name) == (1500, "7460a6fa", "v1-5-pruned-emaonly")
    assert e.hash == sha256(path) and e.short_hash == sha256(path)[:12]
    assert e.family == "SD 1.x (768)" and e.n_vectors == 3
    assert read_embedding(path, name="other").name == "other"


def test_a1111_pt_with_parameter_dict(tmp_path):
    v = vec(2, 1024)
    path = tmp_path / "old.pt"
    torch.save({**a1111_dict(v), "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(v)})}, path)
    e = read_embedding(path)
    assert torch.equal(e.vectors[0], v) and e.family == "SD 2.x (1024)"


@pytest.mark.parametrize("key", ["emb_params", "anything"])
def test_safetensors_single_tensor(tmp_path, key):
    v = vec(4, 768).half()
    path = tmp_path / "kohya.safetensors"
    save_file({key: v}, str(path))
    e = read_embedding(path)
    assert e.vectors[0].dtype == torch.float32 and torch.equal(e.vectors[0], v.float())
    assert e.name == "kohya" and e.step is None


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sdxl_clip_l_clip_g(tmp_path, suffix):
    l, g = vec(2, 768, 1), vec(2, 1280, 2)
    path = tmp_path / f"xl{suffix}"
    if suffix == ".safetensors":
        save_file({"clip_g": g, "clip_l": l}, str(path))
    else:
        torch.save({"clip_g": g, "clip_l": l}, path)
    e = read_embedding(path)
    assert torch.equal(e.vectors[0], l) and torch.equal(e.vectors[1], g)
    assert e.widths == (768, 1280) and e.family.startswith("SDXL")
    assert e.for_widths((768, 1280)) == e.vectors
    assert e.for_widths((1280,))[0] is e.vectors[1]  # the refiner takes clip_g
    assert e.for_widths((768,)) is None


def test_diffusers_learned_embeds(tmp_path):
    one = vec(1, 768)[0]  # diffusers' textual_inversion.py saves {token: (768,)}
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": one}, path)
    e = read_embedding(path)
    assert e.vectors[0].shape == (1, 768) and torch.equal(e.vectors[0][0], one)
    multi = vec(3, 768)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": multi}, str(path))
    assert torch.equal(read_embedding(path).vectors[0], multi)


def to_json(data: dict) -> str:
    """A1111's EmbeddingEncoder: tensors as {"TORCHTENSOR": nested lists}."""
    return json.dumps(data, default=lambda t: {"TORCHTENSOR": t.tolist()})


def test_png_text_chunk(tmp_path):
    v = vec(2, 768).double()
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(to_json(a1111_dict(v, "in-chunk")).encode()).decode())
    path = tmp_path / "preview.png"
    Image.new("RGB", (32, 32), (90, 120, 200)).save(path, pnginfo=info)
    e = read_embedding(path)
    assert e.name == "in-chunk"  # images: the stored name, as A1111
    assert torch.allclose(e.vectors[0], v.float()) and e.step == 1500


def lcg_stream(n: int) -> np.ndarray:
    out, seed = [], 0
    for _ in range(n):
        seed = (1664525 * seed + 1013904223) % 2**32
        out.append(seed % 255)
    return np.array(out, dtype=np.uint64).astype(np.uint8)


def a1111_pixel_encode(image: Image.Image, data: dict, rng: np.random.Generator) -> Image.Image:
    """A1111's insert_image_data_embed, from its published steps: compress, split nibbles, cycle to
    h x k x 3, decorate the high bits, XOR the low bits with the LCG stream, paste low | image | high
    with one black column between."""
    raw = np.frombuffer(zlib.compress(to_json(data).encode(), level=9), np.uint8)
    h = image.size[1]
    size = raw.size + (h - raw.size % h)
    size = size + (h * 3 - size % (h * 3))
    blocks = []
    for nibbles in (raw & 0x0F, raw >> 4):
        block = np.resize(nibbles, size).reshape(h, -1, 3)
        block = block ^ (rng.integers(0, 16, block.shape, dtype=np.uint8) << 4)  # the decoration: high bits
        key = lcg_stream(block.size).reshape(block.shape) & 0x0F
        blocks.append((block ^ key).astype(np.uint8))
    k = blocks[0].shape[1]
    canvas = Image.new("RGB", (image.size[0] + 2 * k + 2, h), (0, 0, 0))
    canvas.paste(Image.fromarray(blocks[0], "RGB"), (0, 0))
    canvas.paste(image, (k + 1, 0))
    canvas.paste(Image.fromarray(blocks[1], "RGB"), (k + 1 + image.size[0] + 1, 0))
    return canvas


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_pixel_border(tmp_path, fmt):
    v = vec(2, 768, 5).double()
    image = a1111_pixel_encode(Image.new("RGB", (40, 48), (200, 180, 90)), a1111_dict(v, "in-pixels"),
                               np.random.default_rng(0))
    path = tmp_path / f"card.{fmt.lower()}"
    image.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    e = read_embedding(path)
    assert e.name == "in-pixels" and torch.allclose(e.vectors[0], v.float())


# ---------------------------------------------------------------------------------------- bad files


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    pt = tmp_path / "cut.pt"
    torch.save(a1111_dict(vec(2, 768)), pt)
    pt.write_bytes(pt.read_bytes()[:200])
    st = tmp_path / "cut.safetensors"
    save_file({"emb_params": vec(2, 768)}, str(st))
    st.write_bytes(st.read_bytes()[:100])
    png = tmp_path / "cut.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png)
    png.write_bytes(png.read_bytes()[:30])
    for path in (pt, st, png):
        with pytest.raises(ValueError, match=str(path.name)) as err:
            read_embedding(path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("contents, message", [
    ({"a": torch.zeros(2, 8), "b": torch.zeros(2, 8)}, "holds 2 tensors"),
    ({"step": 3}, "holds no embedding"),
    ({"string_to_param": {"*": torch.zeros(1, 8), "x": torch.zeros(1, 8)}}, "exactly one tensor"),
    ({"emb_params": torch.zeros(2, 3, 4)}, "expected \\(vectors, width\\)"),
    ({"emb_params": torch.zeros(2, 4, dtype=torch.int64)}, "float tensor"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "vector counts differ"),
])
def test_files_without_one_embedding(tmp_path, contents, message):
    path = tmp_path / "bad.pt"
    torch.save(contents, path)
    with pytest.raises(ValueError, match=message):
        read_embedding(path)


def test_not_an_embedding(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="list.pt holds a list, not an embedding"):
        read_embedding(path)
    plain = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (100, 100, 100)).save(plain)
    with pytest.raises(ValueError, match="no sd-ti-embedding text chunk"):
        read_embedding(plain)
    with pytest.raises(ValueError, match="accepted: .safetensors"):
        read_embedding(tmp_path / "x.txt")


def test_embedding_checks_its_vectors():
    with pytest.raises(ValueError, match="vector counts differ"):
        Embedding("x", (torch.zeros(2, 4), torch.zeros(1, 6)))
