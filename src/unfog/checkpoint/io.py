"""safetensors files with a JSON metadata header, written atomically.

unfog's own model files keep everything needed to rebuild the model in the safetensors metadata
(a str -> str map): each value is a JSON document.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .pickle_reader import load_pickle_checkpoint


TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: ".<name>.<random>.tmp" beside the target


def atomic_write(path: Path, write, *, replace: bool = True) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``: a crash leaves
    either the old file or the new one, never half of one. With ``replace=False`` an existing
    ``path`` is never replaced, even one that appeared meanwhile: FileExistsError (the file is
    linked into place, which fails where a name exists, instead of renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            Path(tmp).unlink()
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_from(stream: BinaryIO, offset: int = 0) -> str:
    """The sha256 (full hex) of a binary stream's bytes from ``offset`` to its end, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    stream.seek(offset)
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def tensor_data_sha256(stream: BinaryIO) -> str:
    """The sha256 (full hex) of a safetensors file's tensor data: every byte after the 8-byte
    header length and the JSON header, so metadata edits leave it unchanged. This is kohya's
    ``sshs_model_hash`` (sd-webui-additional-networks' "addnet" hash); A1111 shows its first 12
    digits as a LoRA's hash."""
    stream.seek(0)
    header = int.from_bytes(stream.read(8), "little")
    return sha256_from(stream, 8 + header)


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors (made contiguous, on the CPU) and JSON-encoded metadata, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a safetensors file, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return tensors, {k: _json_or_text(v) for k, v in raw.items()}


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The decoded metadata of a safetensors file, read from its header only; None for a file that
    is not a readable ``.safetensors`` file (the loaders say what is wrong with it)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    return {k: _json_or_text(v) for k, v in raw.items()}


def recommended_settings(path: str | Path, format: str) -> dict[str, Any]:
    """The sampling settings (sampler, steps, cfg_scale) an unfog model file of ``format`` recommends
    in its ``defaults`` metadata, read from the header only; {} for any other file."""
    meta = read_metadata(path) or {}
    return dict(meta.get("defaults") or {}) if meta.get("format") == format else {}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # metadata written by other tools is plain text


SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of any model file people have: safetensors or a ``torch.save`` file
    (a zip archive, or the legacy pre-1.6 stream).

    The extension must be one we accept; the format is then read from the file's first bytes, so a
    renamed file (a safetensors file called ``.ckpt``) still loads: byte 8 of a safetensors file opens
    its JSON header, where a torch zip archive never has ``{``. Torch pickles are read with
    :func:`~unfog.checkpoint.pickle_reader.load_pickle_checkpoint`, which runs no code from them.
    """
    path = Path(path)
    accepted = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS
    if path.suffix.lower() not in accepted:
        raise ValueError(f"{path}: unknown model file extension {path.suffix!r}; accepted: {', '.join(accepted)}")
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return load_safetensors(path)
    if not head:
        raise ValueError(f"{path} is empty (0 bytes); unfog expected a model file (safetensors or torch.save)")
    if path.suffix.lower() in SAFETENSORS_EXTENSIONS and not head.startswith(b"PK"):  # PK: a renamed torch zip
        raise ValueError(f"{path} is not a safetensors file (no JSON header after its first 8 bytes: truncated, "
                         "corrupt or another kind of file); unfog expected a model file (safetensors or torch.save)")
    return load_pickle_checkpoint(path)  # zip or legacy; names bare-pickle and corrupt files clearly
