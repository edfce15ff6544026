"""What a server offers by name: the model files of its folders (and the embedded model), LoRAs,
hypernetworks, embeddings and VAEs. A request names a model by A1111's title
("sub/name.safetensors [hash]"), its file name or its stem; only files found in the configured
folders can be named, so no request reaches a path outside them."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.embeddings import EMBEDDING_SUFFIXES
from ..jobs import ModelCache
from ..pipelines.hypernetwork import HYPERNETWORK_EXTENSIONS
from ..pipelines.lora import LORA_EXTENSIONS

MODEL_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")


class NotFound(ValueError):
    """A name that is not in the server's folders (HTTP 404)."""


@dataclass(frozen=True)
class Entry:
    """One file offered by name: ``name`` relative to its folder, with the extension."""

    name: str
    path: Path

    @property
    def stem(self) -> str:
        return Path(self.name).stem if not self.path.is_dir() else self.name


def scan(folders: tuple[Path, ...], suffixes: tuple[str, ...], folders_too: bool = False) -> list[Entry]:
    """The files with ``suffixes`` in ``folders`` and their subfolders (with ``folders_too``, also
    diffusers model folders: those holding ``model_index.json``), sorted by name; the first folder
    given wins a name."""
    found: dict[str, Entry] = {}
    for folder in folders:
        if not folder.is_dir():
            continue  # checked at start-up; a folder removed later lists nothing
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and path.suffix.lower() in suffixes:
                found.setdefault(name, Entry(name, path))
            elif folders_too and path.is_dir() and (path / "model_index.json").is_file():
                found.setdefault(name, Entry(name, path))
    return sorted(found.values(), key=lambda e: e.name.lower())


class Library:
    """The server's named files. ``default``: the model loaded at start (``--model``, else the
    embedded shapes model), always offered, under its file name."""

    def __init__(self, default: Path, model_dirs=(), lora_dirs=(), embedding_dirs=(), hypernetwork_dirs=(),
                 vae_dirs=(), controlnet_dirs=()):
        self.default = Path(default)
        self.model_dirs, self.lora_dirs = tuple(map(Path, model_dirs)), tuple(map(Path, lora_dirs))
        self.embedding_dirs = tuple(map(Path, embedding_dirs))
        self.hypernetwork_dirs, self.vae_dirs = tuple(map(Path, hypernetwork_dirs)), tuple(map(Path, vae_dirs))
        self.controlnet_dirs = tuple(map(Path, controlnet_dirs))
        for flag, folders in (("--models-dir", self.model_dirs), ("--lora-dir", self.lora_dirs),
                              ("--embeddings-dir", self.embedding_dirs),
                              ("--hypernetwork-dir", self.hypernetwork_dirs), ("--vae-dir", self.vae_dirs),
                              ("--controlnet-dir", self.controlnet_dirs)):
            for folder in folders:
                if not folder.is_dir():
                    raise ValueError(f"{flag} {folder}: not a folder")
                if not os.access(folder, os.R_OK | os.X_OK):
                    raise ValueError(f"{flag} {folder}: this user cannot read the folder (permissions)")

    def models(self) -> list[Entry]:
        entries = scan(self.model_dirs, MODEL_SUFFIXES, folders_too=True)
        if not any(e.path.resolve() == self.default.resolve() for e in entries):
            entries.insert(0, Entry(self.default.name, self.default))
        return entries

    def loras(self) -> list[Entry]:
        return scan(self.lora_dirs, LORA_EXTENSIONS)

    def hypernetworks(self) -> list[Entry]:
        return scan(self.hypernetwork_dirs, HYPERNETWORK_EXTENSIONS)

    def embeddings(self) -> list[Entry]:
        return scan(self.embedding_dirs, EMBEDDING_SUFFIXES)

    def controlnets(self) -> list[Entry]:
        from ..pipelines.control_units import CONTROLNET_SUFFIXES

        return scan(self.controlnet_dirs, CONTROLNET_SUFFIXES)

    def vaes(self) -> list[Entry]:
        return scan(self.vae_dirs, VAE_SUFFIXES)

    @staticmethod
    def title(entry: Entry, cache: ModelCache) -> str:
        """A1111's checkpoint title: "name [hash10]" once the file's hash is known (it is computed
        when a model is first used, as A1111 does), else the name."""
        known = cache.known_id(entry.path)
        return f"{entry.name} [{known.hash}]" if known is not None and known.hash else entry.name

    def find_model(self, name: str, cache: ModelCache) -> Entry:
        """The model a request names: by title, name with or without the hash, or stem."""
        return _find(name, self.models(), "model", "GET /sdapi/v1/sd-models", lambda e: self.title(e, cache))

    def find_vae(self, name: str) -> Entry | None:
        """The VAE for A1111's ``sd_vae`` option: None for "Automatic" / "None" (the model's own)."""
        if name in ("Automatic", "None", "", None):
            return None
        return _find(name, self.vaes(), "VAE", "GET /sdapi/v1/sd-vae", lambda e: e.name)


def _find(name: str, entries: list[Entry], what: str, listing: str, title) -> Entry:
    wanted = str(name).strip()
    bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
    for e in entries:
        if wanted in (title(e), e.name) or bare in (e.name, e.stem):
            return e
    close = difflib.get_close_matches(bare, [e.name for e in entries], n=3, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else f"; {listing} lists the {len(entries)} there are"
    raise NotFound(f"{what} {name!r} is not in the server's folders{hint}")
