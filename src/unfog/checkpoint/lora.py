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

A file may also bundle textual-inversion embeddings (pivotal tuning: an embedding per new word,
trained with the LoRA), as A1111's Lora extension reads them (``networks.py``, ``bundle_emb``)::

    bundle_emb.<name>.string_to_param.<key>    (n, W)   one text encoder (A1111's .pt dict, flattened)
    bundle_emb.<name>.clip_l / .clip_g         (n, W)   SDXL
    bundle_emb.<name>.emb_params               (n, W)   (any other single tensor, as an embedding file)

The name is the text between the first two dots. ``bundled_embeddings`` reads them into
``Embedding``s; they are not adapters and are never reported as unmatched keys.

Writing (``save_lora``) is the inverse for kohya's own naming (``kohya_key``), with kohya's ``ss_*``
and ``modelspec.*`` metadata (``kohya_metadata``) and its two hashes (``addnet_hashes``); bundled
embeddings are written in the first (one text encoder) or second (SDXL) layout above.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ..choices import check_choice
from ..nn.lora import TRAINABLE, AdapterLayer, AdapterWeights, TrainableLayer
from .components import few
from .embeddings import Embedding, embedding_vectors
from .convert import diffusers_unet_rows
from .io import atomic_write, load_state_dict, tensor_data_sha256

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
# Bundled textual-inversion embeddings (A1111's Lora extension): bundle_emb.<name>.<tensor>.
BUNDLE_PREFIX = "bundle_emb."


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
    embeddings: the textual-inversion embeddings the file bundles, by name (``bundled_embeddings``).
    metadata: the safetensors header (kohya's ``ss_*``, ``modelspec.*``, ...), decoded.
    unparsed: keys that are not adapter tensors (reported by the loader, never silently dropped).
    """

    path: Path
    adapters: dict[str, AdapterWeights]
    metadata: dict[str, Any] = field(default_factory=dict)
    unparsed: list[str] = field(default_factory=list)
    embeddings: dict[str, Embedding] = field(default_factory=dict)

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
        if key.startswith(BUNDLE_PREFIX):  # bundled embeddings: bundled_embeddings reads them
            continue
        split = None if key in IGNORED else split_key(key)
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
    if not adapters and not any(k.startswith(BUNDLE_PREFIX) for k in state_dict):
        raise ValueError(f"{what} holds no LoRA or LyCORIS weights (keys like {few(state_dict) or 'none'}); is it a "
                         "LoRA file?")
    return adapters, unparsed


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA / LyCORIS file (``.safetensors``, or ``.pt`` / ``.ckpt`` read without running pickle
    code), parsed. A file that is not one is a one-line ValueError."""
    path = Path(path)
    state_dict, metadata = load_state_dict(path)
    adapters, unparsed = parse_adapters(state_dict, str(path))
    return LoraFile(path, adapters, metadata, unparsed, bundled_embeddings(state_dict, path))


def bundled_embeddings(state_dict: Mapping[str, Tensor], path: Path) -> dict[str, Embedding]:
    """The embeddings a LoRA file bundles, by name: its ``bundle_emb.<name>.<tensor>`` keys grouped
    per name as A1111 groups them (``string_to_param.<key>`` into a ``string_to_param`` dict), then
    read as an embedding file's contents (``embedding_vectors``). Each comes with the LoRA's path
    and no hash of its own (A1111's ``TI hashes`` leave bundled embeddings to ``Lora hashes``)."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name, _, tensor = key[len(BUNDLE_PREFIX):].partition(".")
        if not name or not tensor:
            raise ValueError(f"{path}: {key} is not a bundled embedding key (bundle_emb.NAME.string_to_param.*, "
                             "bundle_emb.NAME.clip_l / clip_g)")
        data = groups.setdefault(name, {})
        if tensor.startswith("string_to_param."):
            data.setdefault("string_to_param", {})[tensor[len("string_to_param."):]] = value
        else:
            data[tensor] = value
    return {name: Embedding(name, embedding_vectors(data, f"{path}: bundled embedding {name}"), path=path)
            for name, data in groups.items()}


def bundle_tensors(embeddings: Iterable[Embedding]) -> dict[str, Tensor]:
    """The ``bundle_emb`` keys of ``embeddings`` as A1111 reads them back: ``string_to_param.*`` for
    one text encoder, ``clip_l`` / ``clip_g`` for SDXL. A name A1111 could not read back (empty,
    or with a ".") or given twice is a ValueError."""
    tensors: dict[str, Tensor] = {}
    for e in embeddings:
        if not e.name or "." in e.name:
            raise ValueError(f"bundled embedding name {e.name!r}: A1111 reads the name up to the first '.', so it "
                             "must be non-empty and without dots")
        prefix = f"{BUNDLE_PREFIX}{e.name}."
        if any(k.startswith(prefix) for k in tensors):
            raise ValueError(f"two bundled embeddings are named {e.name!r}")
        rows = [v.detach().float().cpu().contiguous() for v in e.vectors]
        if len(rows) == 1:
            tensors[prefix + "string_to_param.*"] = rows[0]
        elif len(rows) == 2:
            tensors.update({prefix + "clip_l": rows[0], prefix + "clip_g": rows[1]})
        else:
            raise ValueError(f"bundled embedding {e.name!r} has {len(rows)} vector sets; a file holds one (SD 1.x / "
                             "2.x) or clip_l + clip_g (SDXL)")
    return tensors


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


@functools.lru_cache(maxsize=8)
def _diffusers_rows(config) -> dict[str, str]:
    """Our U-Net module path -> diffusers' module path, for the blocks the diffusers-folder table names."""
    return {dst: src for src, dst, _ in diffusers_unet_rows(config)}


def _diffusers_name(path: str, rows: Mapping[str, str]) -> str | None:
    """diffusers' name of our U-Net module ``path`` (the longest prefix the table names), or None."""
    prefix = path
    while prefix not in rows and "." in prefix:
        prefix = prefix.rsplit(".", 1)[0]
    return rows[prefix] + path[len(prefix):] if prefix in rows else None


def _diffusers_names(unet) -> dict[str, str]:
    """Our U-Net module path -> diffusers' module path, from the table that loads diffusers folders."""
    rows = _diffusers_rows(unet.config)
    names = {path: _diffusers_name(path, rows) for path, _ in unet.named_modules()}
    return {path: name for path, name in names.items() if name is not None}


def adaptable_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(path, layer) of every Linear / Conv2d of ``model``. A LoRA wrapper (``nn.lora``'s trainable
    LoRA / LoHa / LoKr layers or AdapterLayer, as a LoRA training run holds) stands for the layer it
    wraps, under that layer's path; its own factors are not layers of the model."""
    inside: str | None = None  # the path of the wrapper being walked (named_modules is pre-order)
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside + "."):
            continue
        if isinstance(module, (TrainableLayer, AdapterLayer)):
            inside = path
            yield path, module.base
        elif isinstance(module, ADAPTABLE):
            yield path, module


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
        for path, module in adaptable_modules(unet):
            target = Target("unet", path, module)
            names = [path, "lora_unet_" + path.replace(".", "_")]
            if path in diffusers:
                d = diffusers[path]
                names += [d, "unet." + d, "lora_unet_" + d.replace(".", "_")]
            self._add(target, names)

    def _add_text(self, component: str, encoder: nn.Module) -> None:
        for path, module in adaptable_modules(encoder):
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


# ---------------------------------------------------------------- writing kohya files

# The model families a file can be written for (the pipelines' names). kohya's SD 1.x / 2.x trainers
# name U-Net modules as diffusers does; its SDXL trainers keep the LDM (sgm) names, which are ours.
NamingFamily = Literal["sd1", "sd2", "sdxl", "sdxl_refiner"]
NAMING_FAMILIES: tuple[str, ...] = get_args(NamingFamily)
_LDM_NAMED = ("sdxl", "sdxl_refiner")
_KOHYA_TEXT_PREFIX = {("text_encoder", False): "lora_te_", ("text_encoder", True): "lora_te1_",
                      ("text_encoder_2", True): "lora_te2_"}
# tensor name in AdapterWeights.tensors -> its kohya / LyCORIS key suffix: the first spelling SUFFIXES lists.
_WRITE_SUFFIX = {name: suffix for suffix, (_, name) in reversed(SUFFIXES.items())}


def _check_family(family: str) -> None:
    if family not in NAMING_FAMILIES:
        raise ValueError(f"unknown model family {family!r} for LoRA key names; valid: {', '.join(NAMING_FAMILIES)}")


def kohya_key(target: Target, family: NamingFamily, unet_config=None) -> str:
    """The kohya module key of ``target``, as kohya's trainers write it (and ``ModuleIndex`` reads):
    U-Net ``lora_unet_`` + the diffusers module name (SD 1.x / 2.x, and unfog's own sd1 / sd2-family
    models; needs ``unet_config`` to map our LDM names) or + our LDM name (SDXL), dots -> "_"; text
    encoders ``lora_te_`` (one encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL) + the transformers
    name ``text_model.encoder.layers.N....``, dots -> "_"."""
    _check_family(family)
    sdxl = family in _LDM_NAMED
    if target.component == "unet":
        name = target.path
        if not sdxl:
            if unet_config is None:
                raise ValueError(f"naming the U-Net module {target.path} for {family} needs the U-Net's config "
                                 "(kohya's SD 1.x / 2.x files use diffusers' module names)")
            name = _diffusers_name(target.path, _diffusers_rows(unet_config))
            if name is None:
                raise ValueError(f"U-Net module {target.path} has no diffusers name, so no kohya key")
        return "lora_unet_" + name.replace(".", "_")
    prefix = _KOHYA_TEXT_PREFIX.get((target.component, sdxl))
    if prefix is None or (family == "sdxl_refiner" and target.component == "text_encoder"):
        raise ValueError(f"a {family} model has no {target.component} to name ({target.path})")
    return prefix + ("text_model." + target.path).replace(".", "_")


def _adapter_tensors(key: str, adapter: AdapterWeights, shape: torch.Size) -> dict[str, Tensor]:
    """The file's tensors of one adapter: kohya / LyCORIS names, alpha always written (rank if None)."""
    adapter.check()
    t = adapter.tensors
    if adapter.kind == "lora" and "lora_mid" not in t:  # cheap fit check for the usual case
        fits = (t["lora_up"].shape[0], t["lora_down"][0].numel()) == (shape[0], shape[1:].numel())
        if not fits:
            raise ValueError(f"{key}: lora_up {tuple(t['lora_up'].shape)} and lora_down "
                             f"{tuple(t['lora_down'].shape)} do not fit a weight of shape {tuple(shape)}")
    else:
        adapter.delta(shape)  # raises if the factors do not fit the weight
    out = {key + _WRITE_SUFFIX[name]: value.detach().to("cpu").contiguous() for name, value in t.items()}
    out[key + ".alpha"] = torch.tensor(float(adapter.alpha) if adapter.alpha else float(adapter.rank))
    return out


def addnet_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` (``train_util.precalculate_safetensors_
    hashes``, for sd-webui-additional-networks): the tensors serialized with the ``ss_*`` metadata
    alone; the model hash is the sha256 of the tensor data after the header (the full-length form of
    A1111's short hash, the same whatever the header holds), the legacy hash the first 8 hex digits
    of the sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of that serialization."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return {"sshs_model_hash": tensor_data_sha256(io.BytesIO(data)),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def save_lora(path: str | Path, adapters: Mapping[Target, AdapterWeights], family: NamingFamily,
              metadata: Mapping[str, str], *, unet_config=None, overwrite: bool = False,
              embeddings: Iterable[Embedding] = ()) -> dict[str, str]:
    """Write ``adapters`` as a kohya LoRA / LyCORIS ``.safetensors`` file, atomically: module keys
    from ``kohya_key`` (``unet_config`` as there), tensor names ``.lora_down.weight`` /
    ``.lora_up.weight`` / ``.alpha`` (LoHa / LoKr: their LyCORIS names), contiguous CPU tensors in
    their own dtype. ``metadata`` (kohya's ``ss_*``, ``modelspec.*``: see ``kohya_metadata``) is
    stored as plain strings, as kohya, A1111 and ComfyUI read it, with ``addnet_hashes`` added.
    ``embeddings`` are bundled as ``bundle_emb`` keys (``bundle_tensors``). An existing file is a FileExistsError unless ``overwrite``. Returns the metadata written."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a kohya LoRA file is .safetensors, got {path.suffix or 'no extension'!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if not adapters:
        raise ValueError(f"{path}: no adapters to save")
    not_text = sorted(k for k, v in metadata.items() if not isinstance(v, str) or not isinstance(k, str))
    if not_text:
        raise ValueError(f"LoRA metadata values must be strings (kohya and A1111 read them so): {not_text}")
    tensors: dict[str, Tensor] = {}
    for target, adapter in adapters.items():
        key = kohya_key(target, family, unet_config)
        if key + ".alpha" in tensors:
            raise ValueError(f"two adapters have the kohya key {key}")
        tensors.update(_adapter_tensors(key, adapter, target.module.weight.shape))
    tensors.update(bundle_tensors(embeddings))
    written = {**metadata, **addnet_hashes(tensors, metadata)}
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=written))
    return written


# modelspec.architecture (Stability AI's model spec) and kohya's ss_base_model_version per family.
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                 "sdxl_refiner": "stable-diffusion-xl-v1-refiner"}
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sdxl_refiner": "sdxl_refiner_v1-0"}
_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024, "sdxl_refiner": 1024}


def kohya_metadata(family: NamingFamily, *, rank: int, alpha: float, output_name: str, started_at: float,
                   prediction: str = "eps", conv_rank: int | None = None, conv_alpha: float | None = None,
                   resolution: int | None = None, title: str | None = None, algo: str = "lora",
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The usual kohya ``ss_*`` fields and ``modelspec.*`` of a LoRA, all strings, from explicit
    arguments: ``rank`` / ``alpha`` the network's dim and alpha (``conv_*`` for 3x3 convs, in
    ``ss_network_args`` as kohya writes them), ``started_at`` a Unix time, ``prediction`` "eps" or
    "v", ``resolution`` the training side (default: the family's; SD 2.x v-models 768). ``algo``
    "loha" / "lokr" records the network as kohya + LyCORIS do (``ss_network_module`` lycoris.kohya,
    ``algo`` in ``ss_network_args``; without conv_rank the preset "attn-mlp", whose targets are
    ours: LyCORIS' default preset also trains the ResBlocks). ``extra`` (e.g. ``ss_num_train_images``,
    ``ss_learning_rate``) is added last and wins."""
    _check_family(family)
    check_choice("network algo", algo, TRAINABLE)
    if prediction not in ("eps", "v"):
        raise ValueError(f"unknown prediction type {prediction!r} for LoRA metadata; valid: eps, v")
    v = prediction == "v"
    arch = "stable-diffusion-v2-768-v" if family == "sd2" and v else _ARCHITECTURE[family]
    side = resolution or (768 if family == "sd2" and v else _RESOLUTION[family])
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": _BASE_MODEL_VERSION[family], "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(v), "ss_output_name": output_name, "ss_training_started_at": str(started_at),
        "ss_resolution": f"({side}, {side})",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if family in _LDM_NAMED
                                     else "diffusers"),
        "modelspec.title": title or output_name, "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at), datetime.timezone.utc).isoformat(),
    }
    args = {} if algo == "lora" else {"algo": algo}
    if conv_rank is not None:
        conv_alpha = conv_rank if conv_alpha is None else conv_alpha
        args.update({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha))})
    elif algo != "lora":
        args["preset"] = "attn-mlp"
    if algo != "lora":
        meta["ss_network_module"] = "lycoris.kohya"
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return {**meta, **(extra or {})}
