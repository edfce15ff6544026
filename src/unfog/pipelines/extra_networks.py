"""A1111's "extra networks" in prompts: the tags ``<KIND:NAME:FIELD:…>`` (``<lora:NAME:W>``, which
LyCORIS' extension also wrote as ``<lyco:…>``, and ``<hypernet:NAME:W>``), the folders their files
are found in, and the check of a tag's weight. One parser for every kind; ``lora.py`` and
``hypernetwork.py`` give the fields their meaning.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from pathlib import Path


def _tag_pattern(kinds: Sequence[str]) -> re.Pattern[str]:
    return re.compile(rf"<(?:{'|'.join(map(re.escape, kinds))}):([^:>]+)((?::[^:>]*)*)>")


def extract_network_tags(prompt: str, kinds: Sequence[str]) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """The prompt without its ``<KIND:NAME:…>`` tags of ``kinds``, and each tag as (the tag as
    written, NAME, the fields after it)."""
    pattern = _tag_pattern(kinds)
    tags = [(m[0], m[1].strip(), [f.strip() for f in m[2].split(":")[1:]]) for m in pattern.finditer(prompt)]
    return pattern.sub("", prompt), tags


def finite_weight(value: object, what: str) -> float:
    """``value`` as a finite float, or a ValueError naming ``what``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def find_named_file(name: str, folders: Sequence[str | Path], extensions: Sequence[str], what: str,
                    kind: str, flag: str) -> Path:
    """The ``what`` file called ``name`` (its stem) in ``folders`` or their subfolders, for the
    prompt tag ``<kind:NAME>`` (folders given with ``flag``); the first folder given wins. An
    unknown name is a ValueError naming the closest ones."""
    if not folders:
        raise ValueError(f"the prompt asks for <{kind}:{name}>; give the folder that holds it with {flag}")
    found = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {folder}")
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in extensions and path.is_file():
                found.setdefault(path.stem, path)
    if name in found:
        return found[name]
    close = difflib.get_close_matches(name, list(found), n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else f"; {len(found)} {what}s there" + (
        f", e.g. {', '.join(sorted(found)[:3])}" if found else "")
    raise ValueError(f"{what} {name!r} not found in {', '.join(str(f) for f in folders)}{hint}")
