"""LoRA and LyCORIS files -> adapters on unfog's modules: one table of key suffixes, one index of
module names per model.

A LoRA file is a flat state dict. Each key is ``<module key><suffix>``; the suffix says which
tensor of which adapter kind it is (``SUFFIXES``), the module key which layer it changes. The
module keys come in four namings, all resolved by one index built from the model itself
(``ModuleIndex``): every ``nn.Linear`` / ``nn.Conv2d`` of the U-Net and text encoders is listed
under each name a file may give it:

==================  =================================================  =====================
format              U-Net module                                       text encoder module
==================  =================================================  =====================
kohya / A1111       ``lora_unet_`` + diffusers name, dots -> ``_``     ``lora_te_`` (SDXL:
                    (SD 1.x / 2.x), or + LDM name (SDXL)                ``lora_te1_`` /
                                                                       ``lora_te2_``) + the
                                                                       transformers name
diffusers / PEFT    ``unet.`` + diffusers name                          ``text_encoder.`` /
                                                                       ``text_encoder_2.``
LyCORIS             as kohya                                           as kohya
==================  =================================================  =====================

Both U-Net namings are accepted for every family (SDXL files made by diffusers-based trainers use
diffusers names), and transformers names with or without ``text_model.``. The diffusers names
come from the same generated table that loads diffusers folders (``convert.diffusers_unet_rows``).

What the file is made for is read off its shapes: the input width of the cross-attention key
projections (768 SD 1.x, 1024 SD 2.x, 2048 SDXL, 1280 the SDXL refiner) and, for a text-encoder-only
file, the text encoder's width; ``check_family`` refuses a file for another model with both named.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.lora import AdapterWeights
from .components import few
from .convert import diffusers_unet_rows
from .io import load_state_dict

# ---------------------------------------------------------------- the key suffixes

# suffix -> (adapter kind, tensor name in AdapterWeights.tensors); "alpha" is the scalar alpha.
# Longest suffixes are tried first, so ".lora_down.weight" wins over a bare ".weight".
SUFFIXES: dict[str, tuple[str | None, str]] = {
    ".lora_down.weight": ("lora", "lora_down"),  # kohya, LoCon
    ".lora_up.weight": ("lora", "lora_up"),
    ".lora_mid.weight": ("lora", "lora_mid"),  # LoCon's CP form
    ".lora.down.weight": ("lora", "lora_down"),  # diffusers (LoRACompatibleLinear)
    ".lora.up.weight": ("lora", "lora_up"),
    ".lora_A.weight": ("lora", "lora_down"),  # PEFT
    ".lora_B.weight": ("lora", "lora_up"),
    ".hada_w1_a": ("loha", "hada_w1_a"),  # LyCORIS LoHa
    ".hada_w1_b": ("loha", "hada_w1_b"),
    ".hada_w2_a": ("loha", "hada_w2_a"),
    ".hada_w2_b": ("loha", "hada_w2_b"),
    ".hada_t1": ("loha", "hada_t1"),
    ".hada_t2": ("loha", "hada_t2"),
    ".lokr_w1": ("lokr", "lokr_w1"),  # LyCORIS LoKr
    ".lokr_w1_a": ("lokr", "lokr_w1_a"),
    ".lokr_w1_b": ("lokr", "lokr_w1_b"),
    ".lokr_w2": ("lokr", "lokr_w2"),
    ".lokr_w2_a": ("lokr", "lokr_w2_a"),
    ".lokr_w2_b": ("lokr", "lokr_w2_b"),
    ".lokr_t2": ("lokr", "lokr_t2"),
    ".dora_scale": (None, "dora_scale"),  # DoRA, with any kind
    ".alpha": (None, "alpha"),
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
# diffusers' first LoRA format: attention processors ``…attn1.processor.to_q_lora.down.weight``.
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<t>down|up)\.weight$")
# Tensors some trainers store beside the adapters that are not adapters of a module.
IGNORED = frozenset({"lora_te_text_model_embeddings_position_ids"})
# A1111's whole-file alias keys that hold no module (kohya's "bundled embeddings" are for later).
_EMBEDDING_PREFIX = "bundle_emb."


def split_key(key: str) -> tuple[str, str] | None:
    """``"lora_unet_x.lora_down.weight"`` -> ``("lora_unet_x", ".lora_down.weight")``; None for a
    key that is not an adapter tensor."""
    match = _PROCESSOR.match(key)
    if match:
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        return f"{match['attn']}.{proj}", f".lora_{match['t']}.weight"
    for suffix in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


# ---------------------------------------------------------------- a file's adapters


@dataclass
class LoraFile:
    """The adapters of one file, by the file's own module keys, with its metadata.

    adapters: module key -> AdapterWeights (checked: every tensor its kind needs, ranks agree).
    metadata: the safetensors header (kohya's ``ss_*``, ``modelspec.*``, ...), decoded.
    unparsed: keys that are not adapter tensors (reported by the loader, never silently dropped).
    """

    path: Path
    adapters: dict[str, AdapterWeights]
    metadata: dict[str, Any] = field(default_factory=dict)
    unparsed: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def kinds(self) -> list[str]:
        return sorted({a.kind for a in self.adapters.values()})

    @property
    def ranks(self) -> list[int]:
        return sorted({a.rank for a in self.adapters.values()})


def parse_adapters(state_dict: Mapping[str, Tensor], what: str = "file") -> tuple[dict[str, AdapterWeights], list[str]]:
    """Group a LoRA state dict by module key into AdapterWeights; also the keys that are not
    adapter tensors. A module whose tensors mix kinds, or miss one, is a ValueError naming it."""
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    kinds: dict[str, set[str]] = defaultdict(set)
    unparsed = []
    for key, value in state_dict.items():
        split = None if key in IGNORED or key.startswith(_EMBEDDING_PREFIX) else split_key(key)
        if split is None:
            unparsed.append(key)
            continue
        module, suffix = split
        kind, name = SUFFIXES[suffix]
        groups[module][name] = value
        if kind is not None:
            kinds[module].add(kind)
    adapters = {}
    for module, tensors in groups.items():
        found = kinds[module]
        if len(found) != 1:
            have = ", ".join(sorted(tensors))
            problem = "no adapter weights" if not found else "tensors of " + " and ".join(sorted(found))
            raise ValueError(f"{what}: module {module} has {problem} ({have})")
        alpha = tensors.pop("alpha", None)
        adapter = AdapterWeights(found.pop(), tensors, None if alpha is None else float(alpha))
        try:
            adapter.check()
        except ValueError as err:
            raise ValueError(f"{what}: module {module}: {err}") from None
        adapters[module] = adapter
    if not adapters:
        raise ValueError(f"{what} holds no LoRA or LyCORIS weights (keys like {few(state_dict) or 'none'}); is it a "
                         "LoRA file?")
    return adapters, unparsed


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA / LyCORIS file (``.safetensors``, or ``.pt`` / ``.ckpt`` read without running pickle
    code), parsed. A file that is not one is a one-line ValueError."""
    path = Path(path)
    state_dict, metadata = load_state_dict(path)
    adapters, unparsed = parse_adapters(state_dict, str(path))
    return LoraFile(path, adapters, metadata, unparsed)


# ---------------------------------------------------------------- the models' module names

# The models a LoRA can change, by the pipeline attribute that holds them, with the kohya prefix
# and the diffusers prefix of each (SDXL's kohya text encoder prefixes are lora_te1_ / lora_te2_).
KOHYA_TEXT_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
DIFFUSERS_TEXT_PREFIXES = {"text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
ADAPTABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """One module a LoRA may change: the pipeline attribute holding its model, its dotted path
    there, and the module itself."""

    component: str
    path: str
    module: nn.Module

    @property
    def is_text(self) -> bool:
        return self.component != "unet"


def _diffusers_names(unet) -> dict[str, str]:
    """Our U-Net module path -> diffusers' module path, from the table that loads diffusers folders."""
    rows = {dst: src for src, dst, _ in diffusers_unet_rows(unet.config)}
    names = {}
    for path, _ in unet.named_modules():
        prefix = path
        while prefix not in rows and "." in prefix:
            prefix = prefix.rsplit(".", 1)[0]
        if prefix in rows:
            names[path] = rows[prefix] + path[len(prefix):]
    return names


class ModuleIndex:
    """Every name a LoRA file may give to each adaptable module of a set of models."""

    def __init__(self, models: Mapping[str, nn.Module | None]):
        self.names: dict[str, Target] = {}
        for component, model in models.items():
            if model is None:
                continue
            if component == "unet":
                self._add_unet(model)
            else:
                self._add_text(component, model)

    def _add(self, target: Target, names: Iterable[str]) -> None:
        for name in names:
            self.names.setdefault(name, target)

    def _add_unet(self, unet: nn.Module) -> None:
        diffusers = _diffusers_names(unet)
        for path, module in unet.named_modules():
            if not isinstance(module, ADAPTABLE):
                continue
            target = Target("unet", path, module)
            names = [path, "lora_unet_" + path.replace(".", "_")]
            if path in diffusers:
                d = diffusers[path]
                names += [d, "unet." + d, "lora_unet_" + d.replace(".", "_")]
            self._add(target, names)

    def _add_text(self, component: str, encoder: nn.Module) -> None:
        for path, module in encoder.named_modules():
            if not isinstance(module, ADAPTABLE):
                continue
            target = Target(component, path, module)
            hf = "text_model." + path  # the transformers name, which kohya uses for OpenCLIP encoders too
            names = [DIFFUSERS_TEXT_PREFIXES[component] + hf, DIFFUSERS_TEXT_PREFIXES[component] + path]
            names += [prefix + hf.replace(".", "_") for prefix in KOHYA_TEXT_PREFIXES[component]]
            self._add(target, names)

    def resolve(self, lora: LoraFile) -> tuple[dict[Target, AdapterWeights], list[str]]:
        """The file's adapters on their targets, checked against each module's weight shape, and
        the module keys that match no module. A shape that does not fit is a ValueError."""
        found: dict[Target, AdapterWeights] = {}
        unmatched = []
        for key, adapter in lora.adapters.items():
            target = self.names.get(key)
            if target is None:
                unmatched.append(key)
                continue
            shape = target.module.weight.shape
            try:
                adapter.delta(shape)  # checks that the factors fit the weight
            except ValueError as err:
                raise ValueError(f"{lora.path}: {key} does not fit {target.component}.{target.path} "
                                 f"(weight {tuple(shape)}): {err}") from None
            found[target] = adapter
        return found, unmatched


# ---------------------------------------------------------------- which model a file is for

# Cross-attention context width -> the family that has it; text encoder width -> likewise.
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL refiner"}
TEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x"}
_CROSS_KEY = re.compile(r"attn2[._]to_k$")
_TEXT_KEY = re.compile(r"self_attn[._]q_proj$")


def describe_width(width: int, table: Mapping[int, str], what: str) -> str:
    name = table.get(width)
    return f"{name} ({what} {width})" if name else f"a model with {what} {width}"


def in_features(adapter: AdapterWeights) -> int:
    """The input width of the Linear an adapter changes, read off its input-side factor."""
    t = adapter.tensors
    if adapter.kind == "lora":
        return t["lora_down"].shape[1]
    if adapter.kind == "loha":
        return t["hada_w1_b"].shape[1]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_b"]
    return w1.shape[1] * w2.shape[1]


def _width(lora: LoraFile, pattern: re.Pattern, text: bool) -> int | None:
    """The input width of the first adapter whose module key matches ``pattern`` (in a text
    encoder or in the U-Net)."""
    for key, adapter in lora.adapters.items():
        if pattern.search(key) and key.startswith(("text_encoder", "lora_te")) == text:
            return in_features(adapter)
    return None


def check_family(lora: LoraFile, unet, text_encoder=None, text_encoder_2=None, model_name: str = "the model") -> None:
    """Refuse a file made for another kind of model, naming both: an SDXL LoRA on SD 1.5 gives
    "… is a LoRA for SDXL (cross-attention width 2048); the model is SD 1.x (…768)"."""
    width = _width(lora, _CROSS_KEY, text=False)
    if width is not None and width != unet.config.context_dim:
        raise ValueError(f"{lora.path} is a LoRA for {describe_width(width, CONTEXT_FAMILIES, 'cross-attention width')}; "
                         f"{model_name} is {describe_width(unet.config.context_dim, CONTEXT_FAMILIES, 'cross-attention width')}")
    sdxl_text = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in lora.adapters)
    if sdxl_text and text_encoder_2 is None:
        raise ValueError(f"{lora.path} is a LoRA for SDXL (it has adapters for two text encoders); {model_name} has "
                         "one text encoder")
    encoder = text_encoder if text_encoder is not None else text_encoder_2
    width = _width(lora, _TEXT_KEY, text=True)
    if width is not None and encoder is not None and not sdxl_text and width != encoder.config.width:
        raise ValueError(f"{lora.path} is a LoRA for {describe_width(width, TEXT_FAMILIES, 'text encoder width')}; "
                         f"{model_name}'s text encoder is {describe_width(encoder.config.width, TEXT_FAMILIES, 'width')}")


def file_family(lora: LoraFile) -> str:
    """What the file is for, read off its keys and shapes: "SDXL (cross-attention width 2048)", …"""
    width = _width(lora, _CROSS_KEY, text=False)
    if width is not None:
        return describe_width(width, CONTEXT_FAMILIES, "cross-attention width")
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in lora.adapters):
        return "SDXL (two text encoders)"
    width = _width(lora, _TEXT_KEY, text=True)
    if width is not None:
        return describe_width(width, TEXT_FAMILIES, "text encoder width")
    return "unknown (no cross-attention or text-encoder adapters)"


def component_of(key: str) -> str:
    """Which model a module key belongs to, by its prefix: "unet", "text_encoder" or "text_encoder_2"."""
    if key.startswith(("lora_te2_", "text_encoder_2.")):
        return "text_encoder_2"
    if key.startswith(("lora_te", "text_encoder.")):
        return "text_encoder"
    return "unet"
