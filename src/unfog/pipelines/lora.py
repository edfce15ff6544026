"""LoRAs on a pipeline: merged into the weights, several at once, each with its own weights, and
taken off again exactly.

Merging keeps a copy of every weight a LoRA changes, taken before the first LoRA touched it, and
computes each changed weight afresh from that copy: W = W0 + sum_i m_i dW_i (``nn.lora.
merged_weight``). So loading, reweighting and unloading in any order never accumulates rounding,
and ``unload_all`` puts back W0 bit for bit. A new file is read, parsed, matched to the modules
and checked in full before any weight is written: a bad file leaves the model as it was.

Also here, for the image commands: A1111's prompt tags ``<lora:NAME:W>``, resolved in LoRA
folders, and the short hash A1111 writes in a PNG's ``Lora hashes``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.io import sha256_from, tensor_data_sha256
from ..checkpoint.lora import LoraFile, ModuleIndex, Target, check_family, read_lora
from ..nn.lora import AdapterWeights, merged_weight
from .extra_networks import extract_network_tags, find_named_file, finite_weight

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


def short_hash(path: str | Path) -> str:
    """A1111's hash of a LoRA file (``Lora hashes`` in a PNG's parameters): the first 12 hex digits
    of the sha256 of a safetensors file's tensor data (the header, which metadata edits change, is
    left out: kohya's "addnet" hash, stored in full as ``sshs_model_hash``), or of a whole other file."""
    with open(path, "rb") as f:
        safetensors = Path(path).suffix.lower() == ".safetensors"
        return (tensor_data_sha256(f) if safetensors else sha256_from(f))[:12]


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA on the pipeline: its file, the multipliers of its U-Net and text-encoder adapters,
    the A1111 short hash, the file's module keys that matched no module of this model, and the
    names of the textual-inversion embeddings it bundles."""

    name: str
    path: Path
    weight: float
    text_encoder_weight: float
    hash: str
    unmatched: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()


class LoraStack:
    """The LoRAs merged into a set of models (``{"unet": …, "text_encoder": …}``)."""

    def __init__(self, models: Mapping[str, nn.Module | None], model_name: str = "the model"):
        self.models = dict(models)
        self.model_name = model_name
        self.applied: list[AppliedLora] = []
        self._adapters: list[dict[Target, AdapterWeights]] = []
        self._originals: dict[Target, Tensor] = {}
        self._index: ModuleIndex | None = None

    @property
    def index(self) -> ModuleIndex:
        if self._index is None:  # built on first use: it walks every module
            self._index = ModuleIndex(self.models)
        return self._index

    def add(self, path: str | Path, weight: float = 1.0, text_encoder_weight: float | None = None,
            name: str | None = None, warn: Callable[[str], None] | None = None) -> AppliedLora:
        """Merge the LoRA at ``path``: U-Net adapters times ``weight``, text-encoder adapters times
        ``text_encoder_weight`` (default: ``weight``). Keys that match no module are reported
        through ``warn`` (count and examples) and kept in ``AppliedLora.unmatched``."""
        return self.add_file(read_lora(path), weight, text_encoder_weight, name, warn)

    def add_file(self, lora: LoraFile, weight: float = 1.0, text_encoder_weight: float | None = None,
                 name: str | None = None, warn: Callable[[str], None] | None = None) -> AppliedLora:
        """``add`` for a file already read. Its bundled embeddings are the pipeline's to apply."""
        weight = finite_weight(weight, "LoRA weight")
        te_weight = weight if text_encoder_weight is None else finite_weight(text_encoder_weight, "text encoder weight")
        check_family(lora, self.models["unet"], self.models.get("text_encoder"), self.models.get("text_encoder_2"),
                     self.model_name)
        adapters, unmatched = self.index.resolve(lora)
        if lora.adapters and not adapters:
            raise ValueError(f"{lora.path}: none of its {len(lora.adapters)} modules is in {self.model_name} (keys like "
                             f"{', '.join(sorted(unmatched)[:3])})")
        if unmatched or lora.unparsed:
            skipped = sorted(unmatched) + sorted(lora.unparsed)
            (warn or warn_on_stderr)(f"{lora.path}: {len(skipped)} of its keys match no module of {self.model_name} and are "
                              f"not applied, e.g. {', '.join(skipped[:3])}")
        applied = AppliedLora(name or lora.name, lora.path, weight, te_weight, short_hash(lora.path),
                              tuple(sorted(unmatched)), tuple(lora.embeddings))
        self._merge(self._adapters + [adapters], self.applied + [applied])
        return applied

    def clear(self) -> None:
        """Take every LoRA off: each changed weight gets its original values back, bit for bit."""
        with torch.no_grad():
            for target, original in self._originals.items():
                target.module.weight.copy_(original)
        self._originals.clear()
        self._adapters.clear()
        self.applied.clear()

    def _merge(self, adapters: list[dict[Target, AdapterWeights]], applied: list[AppliedLora]) -> None:
        """Write W0 + sum of the scaled deltas into every target of ``adapters``; computed in full
        before the first write."""
        per_target: dict[Target, list[tuple[AdapterWeights, float]]] = {}
        for lora, entry in zip(adapters, applied):
            for target, adapter in lora.items():
                m = entry.text_encoder_weight if target.is_text else entry.weight
                per_target.setdefault(target, []).append((adapter, m))
        new = {}
        for target, stack in per_target.items():
            original = self._originals.get(target, target.module.weight.detach())
            new[target] = merged_weight(original.to("cpu"), stack)
        with torch.no_grad():
            for target, weight in new.items():
                if target not in self._originals:
                    self._originals[target] = target.module.weight.detach().clone()
                target.module.weight.copy_(weight)
        self._adapters, self.applied = adapters, applied


def warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- prompt tags and LoRA folders

@dataclass(frozen=True)
class LoraTag:
    """``<lora:NAME:W>`` in a prompt: the U-Net weight W and the text-encoder weight (A1111's
    third field, or W)."""

    name: str
    weight: float
    text_encoder_weight: float


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:…>`` tags (the text encoder never sees them), and the tags.
    A1111 order: ``<lora:NAME:A:B>`` is text-encoder weight A and U-Net weight B."""
    text, found = extract_network_tags(prompt, ("lora", "lyco"))
    tags = []
    for tag, name, fields in found:
        if len(fields) > 2:
            raise ValueError(f"{tag}: a LoRA tag is <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:"
                             "UNET_WEIGHT>")
        numbers = [finite_weight(f, f"the weight in {tag}") for f in fields] or [1.0]
        tags.append(LoraTag(name, numbers[-1], numbers[0]))
    return text, tags


def find_lora(name: str, folders: Sequence[str | Path]) -> Path:
    """The LoRA file called ``name`` (its file name without the extension) in ``folders`` or their
    subfolders; an unknown name is a ValueError naming the closest ones."""
    return find_named_file(name, folders, LORA_EXTENSIONS, "LoRA", "lora", "--lora-dir")


def hashes_text(applied: Iterable[AppliedLora]) -> str:
    """The value A1111 writes as ``Lora hashes``: ``"name: hash, name2: hash2"``."""
    return ", ".join(f"{a.name}: {a.hash}" for a in applied)


def parse_hashes(text: str) -> dict[str, str]:
    """``Lora hashes`` back to {name: hash}."""
    out = {}
    for item in text.split(","):
        name, sep, value = item.strip().rpartition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out


# ---------------------------------------------------------------- unfog lora info

# kohya's training metadata worth showing, in this order, with a label.
SS_FIELDS = (("ss_output_name", "output name"), ("ss_base_model_version", "base model version"),
             ("ss_sd_model_name", "trained on"), ("ss_network_module", "network module"),
             ("ss_network_dim", "dim"), ("ss_network_alpha", "alpha"), ("ss_network_args", "network args"),
             ("ss_num_train_images", "training images"), ("ss_max_train_steps", "steps"),
             ("ss_learning_rate", "learning rate"), ("ss_resolution", "resolution"), ("sshs_model_hash", "hash"))


def describe_lora(path: str | Path, top_tags: int = 10) -> str:
    """What ``unfog lora info`` prints: family, kinds, ranks, targets per model, bundled embeddings, kohya's ``ss_*``
    training metadata (with the most frequent caption tags) and ``modelspec.*``."""
    from ..checkpoint.lora import component_of, file_family

    lora = read_lora(path)
    per_component: dict[str, int] = {}
    for key in lora.adapters:
        per_component[component_of(key)] = per_component.get(component_of(key), 0) + 1
    alphas = sorted({a.alpha for a in lora.adapters.values() if a.alpha is not None})
    lines = [f"file: {lora.path}", f"A1111 hash: {short_hash(lora.path)}", f"for: {file_family(lora)}",
             f"kinds: {', '.join(lora.kinds)}", f"ranks: {', '.join(map(str, lora.ranks))}",
             f"alphas: {', '.join(f'{a:g}' for a in alphas) if alphas else 'none stored (alpha = rank)'}",
             "modules: " + ", ".join(f"{n} {c}" for c, n in sorted(per_component.items()))]
    for e in lora.embeddings.values():
        lines.append(f"bundled embedding: {e.name} ({e.n_vectors} vector{'s' if e.n_vectors > 1 else ''}, "
                     f"for {e.family})")
    if lora.unparsed:
        lines.append(f"other keys: {len(lora.unparsed)} ({', '.join(sorted(lora.unparsed)[:3])})")
    meta = lora.metadata
    for key, label in SS_FIELDS:
        if key in meta:
            lines.append(f"{label}: {meta[key]}")
    tags = _tag_frequency(meta.get("ss_tag_frequency"))
    if tags:
        lines.append("most frequent tags: " + ", ".join(f"{t} ({n})" for t, n in tags[:top_tags]))
    lines += [f"{key}: {value}" for key, value in sorted(meta.items()) if key.startswith("modelspec.")]
    return "\n".join(lines)


def _tag_frequency(value: object) -> list[tuple[str, int]]:
    """kohya's ``ss_tag_frequency`` ({folder: {tag: count}}, stored as JSON) summed over folders."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    counts: dict[str, int] = {}
    if isinstance(value, dict):
        for folder in value.values():
            if isinstance(folder, dict):
                for tag, n in folder.items():
                    if isinstance(n, (int, float)):
                        counts[tag] = counts.get(tag, 0) + int(n)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
