"""Hypernetwork files: AUTOMATIC1111's ``.pt`` and unfog's ``.safetensors`` with the same content.

A1111's file is ``torch.save`` of one dict (read here without running code)::

    {320: (state_dict_k, state_dict_v), 640: (...), 768: (...), 1280: (...),   # by context width
     "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
     "weight_initialization": "Normal", "use_dropout": False, "dropout_structure": [0, 0, 0],
     "activate_output": False, "last_layer_dropout": False, "optional_info": None,
     "name": "...", "step": 1000, "sd_checkpoint": "<hash>", "sd_checkpoint_name": "..."}

Each state dict holds ``linear.N.weight`` / ``linear.N.bias`` of ``nn.hypernetwork``'s Sequential;
files from before October 2022 hold ``linear1.*`` / ``linear2.*`` instead (= ``linear.0`` /
``linear.1``). A key that is missing takes A1111's default when it loads the file
(``Hypernetwork.load``), not the one its UI proposes when it creates one:

    layer_structure [1, 2, 1]; activation_func None (= "linear"); is_layer_norm False;
    activate_output True; use_dropout False; last_layer_dropout False; weight_initialization
    "Normal"; dropout_structure: derived from use_dropout and last_layer_dropout (0.3 after each
    hidden Linear but the last, which gets it only with last_layer_dropout); name: the file name.

unfog's ``.safetensors``: the tensors ``<width>.k.<key>`` and ``<width>.v.<key>`` (e.g.
``768.k.linear.0.weight``), and the same option keys, JSON-encoded, in the metadata, with
``"format": "unfog.hypernetwork"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..nn.hypernetwork import Hypernetwork, HypernetworkOptions
from .io import atomic_write, load_safetensors, save_safetensors
from .pickle_reader import load_pickle_object

FORMAT = "unfog.hypernetwork"
SIDES = ("k", "v")
_LEGACY = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
           "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


def a1111_dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's ``parse_dropout_structure``, for files that predate ``dropout_structure``."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


def options_from(raw: dict[Any, Any]) -> HypernetworkOptions:
    """The options of an A1111-layout dict, with A1111's load defaults for missing keys."""
    layer_structure = list(raw.get("layer_structure") or [1, 2, 1])
    dropout = raw.get("dropout_structure")
    if dropout is None:
        dropout = a1111_dropout_structure(layer_structure, bool(raw.get("use_dropout", False)),
                                          bool(raw.get("last_layer_dropout", False)))
    return HypernetworkOptions(
        layer_structure=tuple(layer_structure),
        activation=raw.get("activation_func") or "linear",
        layer_norm=bool(raw.get("is_layer_norm", False)),
        dropout_structure=tuple(dropout),
        activate_output=bool(raw.get("activate_output", True)),
        weight_init=raw.get("weight_initialization") or "Normal",
    )


def from_a1111_dict(raw: dict[Any, Any], path: Path) -> Hypernetwork:
    """A Hypernetwork from the dict an A1111 ``.pt`` holds; every module is checked before any is
    returned. Errors name the file."""
    try:
        options = options_from(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    pairs = {k: v for k, v in raw.items() if isinstance(k, int) and not isinstance(k, bool)}
    if not pairs:
        raise ValueError(f"{path} holds no hypernetwork modules (no integer context-width keys); is it a "
                         "hypernetwork file?")
    hn = Hypernetwork(pairs, options, name=str(raw.get("name") or path.stem), step=int(raw.get("step") or 0),
                      sd_checkpoint=raw.get("sd_checkpoint"), sd_checkpoint_name=raw.get("sd_checkpoint_name"))
    for width, pair in pairs.items():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise ValueError(f"{path}: entry {width} must be a pair of state dicts (k, v)")
        for side, module, state in zip(SIDES, hn.pairs[str(width)], pair):
            state = {_LEGACY.get(k, k): v for k, v in state.items()}
            _load_module(module, state, f"{path}: the {side} module for width {width}", options)
    return hn


def _load_module(module: torch.nn.Module, state: dict[str, Any], what: str, options: HypernetworkOptions) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} does not fit its options ({_describe(options)}): missing {missing or 'nothing'}, "
                         f"unexpected {unexpected or 'nothing'}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[key].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{what}: {key} has shape {shape}, its options ({_describe(options)}) make it "
                             f"{tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()})


def _describe(o: HypernetworkOptions) -> str:
    return (f"layer_structure {list(o.layer_structure)}, activation {o.activation}, layer norm {o.layer_norm}, "
            f"dropout_structure {list(o.dropout_structure)}, activate_output {o.activate_output}")


def to_a1111_dict(hn: Hypernetwork) -> dict[Any, Any]:
    """The dict A1111 saves, with tensors on the CPU (``torch.save`` it for a ``.pt`` A1111 loads)."""
    o = hn.options
    out: dict[Any, Any] = {
        w: tuple({k: t.detach().cpu() for k, t in m.state_dict().items()} for m in hn.pairs[str(w)])
        for w in hn.widths}
    out.update({
        "step": hn.step, "name": hn.name, "layer_structure": list(o.layer_structure),
        "activation_func": o.activation, "is_layer_norm": o.layer_norm, "weight_initialization": o.weight_init,
        "sd_checkpoint": hn.sd_checkpoint, "sd_checkpoint_name": hn.sd_checkpoint_name,
        "activate_output": o.activate_output, "use_dropout": any(o.dropout_structure),
        "dropout_structure": list(o.dropout_structure),
        "last_layer_dropout": len(o.dropout_structure) >= 2 and o.dropout_structure[-2] != 0,
        "optional_info": None,
    })
    return out


def read_hypernetwork(path: str | Path) -> Hypernetwork:
    """A hypernetwork file: A1111's ``.pt`` or unfog's ``.safetensors``. Raises ValueError naming
    the file for anything wrong (bad options, keys that do not fit them, truncated files)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        tensors, meta = load_safetensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an unfog hypernetwork (its metadata has format "
                             f"{meta.get('format')!r}, not {FORMAT!r})")
        return from_a1111_dict(_unflatten(tensors, meta, path), path)
    raw = load_pickle_object(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not an A1111 hypernetwork (it holds a {type(raw).__name__}, not a dict)")
    return from_a1111_dict(raw, path)


def _unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> dict[Any, Any]:
    raw: dict[Any, Any] = {k: v for k, v in meta.items() if k != "format"}
    for key, tensor in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in SIDES:
            raise ValueError(f"{path}: tensor {key!r} is not <width>.k.<key> or <width>.v.<key>")
        width, side, rest = parts
        raw.setdefault(int(width), ({}, {}))[SIDES.index(side)][rest] = tensor
    return raw


def save_hypernetwork(hn: Hypernetwork, path: str | Path, *, overwrite: bool = False) -> None:
    """Write ``hn`` as unfog's ``.safetensors`` or, for a ``.pt`` path, as A1111's layout, atomically.
    An existing file is a FileExistsError unless ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() not in (".pt", ".safetensors"):
        raise ValueError(f"{path}: a hypernetwork is saved as .safetensors or .pt")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    raw = to_a1111_dict(hn)
    if path.suffix.lower() == ".pt":
        atomic_write(path, lambda tmp: torch.save(raw, tmp), replace=overwrite)
        return
    tensors = {f"{w}.{side}.{k}": t for w in hn.widths for side, state in zip(SIDES, raw[w]) for k, t in state.items()}
    meta = {k: v for k, v in raw.items() if isinstance(k, str)}
    save_safetensors(path, tensors, {"format": FORMAT, **meta})  # atomic too
