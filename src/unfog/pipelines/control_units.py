"""ControlNet units of the image commands: ``--control MODEL:IMAGE[:WEIGHT[:START:END]]``, the
text sd-webui-controlnet writes for each unit in a PNG's parameters, and reading it back.

``--control`` is split so that paths may hold ":" (Windows drives, odd file names): the trailing
fields that are numbers are WEIGHT (one) or WEIGHT:START:END (three); of the rest, MODEL:IMAGE is
split at the ":" after which an existing file follows (it must be the only such ":"); when no
file follows any, at the last ":" not followed by "/" or "\\" (a drive's), and the missing hint
is named. MODEL is a ControlNet file or diffusers folder, or the name (file stem) of one in a
``--controlnet-dir`` folder.

The unit text, as sd-webui-controlnet writes it (its ``ControlNetUnit.serialize``; the value of
``ControlNet 0``, ``ControlNet 1``, ... in the parameters, quoted there as it holds ", " and ": ")::

    Module: none, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Just Resize,
    Low Vram: False, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced

Module is the preprocessor ("none": the hint is used as given); the model's hash is A1111's old
8-digit one (``legacy_hash``), which is what the extension writes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..choices import check_choice
from .controlnet import A1111_CONTROL, A1111_RESIZE, check_unit
from .extra_networks import find_named_file
from .preprocess import A1111_NAMES, PREPROCESSORS

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
UNIT_PREFIX = "ControlNet "
FORMAT = "MODEL:IMAGE[:WEIGHT[:START:END]]"


@dataclass(frozen=True)
class ControlSpec:
    """One unit as the command gives it. resize_mode / control_mode None: the command's
    (``--control-resize``, ``--control-mode``); module: the preprocessor's name, or "none"."""

    model: str
    image: Path | Image.Image  # a file, or an image in memory (the server's)
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    resize_mode: str | None = None
    control_mode: str | None = None
    module: str = "none"
    options: tuple[tuple[str, float], ...] = ()  # the preprocessor's options (e.g. canny's low / high)

    def __post_init__(self) -> None:
        check_unit(self.weight, self.start, self.end, self.resize_mode or "just_resize",
                   self.control_mode or "balanced")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_control(text: str) -> ControlSpec:
    """``--control``'s value -> a ControlSpec (the rule in the module docstring)."""
    fields = text.split(":")
    numbers: list[float] = []
    while len(fields) > 2 and len(numbers) < 3 and _number(fields[-1]) is not None:
        numbers.insert(0, _number(fields.pop()))
    if len(numbers) == 2:
        raise ValueError(f"--control {text!r}: give WEIGHT or WEIGHT:START:END after MODEL:IMAGE, not two numbers")
    rest = ":".join(fields)
    colons = [i for i, c in enumerate(rest) if c == ":" and 0 < i < len(rest) - 1]
    if not colons:
        raise ValueError(f"--control takes {FORMAT}, got {text!r}")
    found = [i for i in colons if Path(rest[i + 1 :]).is_file()]
    if len(found) > 1:
        raise ValueError(f"--control {text!r} can be split into MODEL:IMAGE in {len(found)} ways; rename the files")
    split = found[0] if found else max((i for i in colons if rest[i + 1] not in "/\\"), default=colons[-1])
    model, image = rest[:split], Path(rest[split + 1 :])
    if not found:
        raise FileNotFoundError(f"ControlNet hint image not found: {image}")
    weight, start, end = (numbers + [0.0, 1.0]) if len(numbers) == 1 else (numbers or [1.0, 0.0, 1.0])
    return ControlSpec(model, image, weight, start, end)


def find_controlnet(model: str, folders: Sequence[Path]) -> Path:
    """A ControlNet path as given, else the file called ``model`` in ``folders`` (``--controlnet-dir``)."""
    if Path(model).exists():
        return Path(model)
    if not folders:
        raise FileNotFoundError(f"ControlNet model not found: {model} (give a file, a diffusers folder, or a name "
                                "with --controlnet-dir DIR)")
    return find_named_file(model, folders, CONTROLNET_SUFFIXES, "ControlNet", "control", "--controlnet-dir")


def legacy_hash(path: Path) -> str:
    """A1111's old model hash, which sd-webui-controlnet writes: the sha256 of the 64 KiB at 1 MiB,
    8 hex digits; for a diffusers folder, of its weights file."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in CONTROLNET_SUFFIXES)
        if not files:
            return "NOFILE"
        path = files[0]
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def model_title(path: Path) -> str:
    """How the unit text names a model: ``name [hash]``, name the file's stem (a folder's name)."""
    name = path.name if path.is_dir() else path.stem
    return f"{name} [{legacy_hash(path)}]"


def _text(value: float) -> str:
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def unit_text(spec: ControlSpec, title: str, resize_mode: str, control_mode: str) -> str:
    """The unit's text in the parameters (module docstring)."""
    pairs = {"Module": spec.module, "Model": title, "Weight": _text(spec.weight),
             "Resize Mode": A1111_RESIZE[resize_mode], "Low Vram": "False", "Guidance Start": _text(spec.start),
             "Guidance End": _text(spec.end), "Pixel Perfect": "False", "Control Mode": A1111_CONTROL[control_mode]}
    return ", ".join(f"{k}: {v}" for k, v in pairs.items())


def recorded_units(source: Mapping[str, str]) -> list[dict[str, str]]:
    """The units of a parsed parameters text (``outputs.parse_parameters``), in order, each as
    ``{"Module": ..., "Model": ..., ...}``."""
    keys = sorted((k for k in source if k.startswith(UNIT_PREFIX) and k[len(UNIT_PREFIX):].isdigit()),
                  key=lambda k: int(k[len(UNIT_PREFIX):]))
    units = []
    for key in keys:
        fields = dict(item.strip().split(": ", 1) for item in source[key].split(",") if ": " in item)
        units.append(fields)
    return units


def spec_from_unit(unit: Mapping[str, str], image: Path, where: str) -> ControlSpec:
    """A recorded unit with its hint file -> a ControlSpec; the model is its name, found later in
    ``--controlnet-dir`` and checked against the recorded hash (``check_hash``)."""
    by_resize = {v: k for k, v in A1111_RESIZE.items()} | {"Inner Fit (Scale to Fit)": "crop_and_resize",
                                                            "Outer Fit (Shrink to Fit)": "resize_and_fill"}
    by_control = {v: k for k, v in A1111_CONTROL.items()}
    title = unit.get("Model", "")
    name = title.rsplit(" [", 1)[0].strip()
    if not name or name == "None":
        raise ValueError(f"{where}: a ControlNet unit without a model ({title!r})")
    numbers = {}
    for key, default in (("Weight", 1.0), ("Guidance Start", 0.0), ("Guidance End", 1.0)):
        value = _number(unit.get(key, str(default)))
        if value is None:
            raise ValueError(f"{where}: '{key}: {unit.get(key)}' is not a number")
        numbers[key] = value
    resize, control = unit.get("Resize Mode", "Crop and Resize"), unit.get("Control Mode", "Balanced")
    for what, value, table in (("Resize Mode", resize, by_resize), ("Control Mode", control, by_control)):
        if value not in table:
            raise ValueError(f"{where}: {what} {value!r} is not one unfog has; valid: {', '.join(table)}")
    return ControlSpec(name, image, numbers["Weight"], numbers["Guidance Start"], numbers["Guidance End"],
                       by_resize[resize], by_control[control], unit.get("Module", "none"))


def recorded_hash(unit: Mapping[str, str]) -> str | None:
    title = unit.get("Model", "")
    return title.rsplit(" [", 1)[1].rstrip("]").lower() if title.endswith("]") and " [" in title else None


def preprocessor(name: str) -> Callable | None:
    """The preprocessor called ``name`` (ours, or A1111's module name as its PNGs record it; None
    for "none"): a function from a PIL image to the hint image (``pipelines/preprocess.py``)."""
    if name == "none":
        return None
    ours = A1111_NAMES.get(name, name)
    check_choice("preprocessor", ours, ("none", *PREPROCESSORS))
    return PREPROCESSORS[ours]
