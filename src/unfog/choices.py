"""The one check of a closed set of options (DESIGN.md: closed sets whose errors list the valid values).

Every module that takes a name from a fixed set (a ``Literal``'s ``get_args``, a registry's keys)
checks it here, so the wording is the same everywhere:

    unknown sigma spacing 'cosine'; valid choices: leading, linspace, trailing, karras, ...

It imports nothing, so every layer (``diffusion/`` included, which otherwise imports only torch)
can use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def check_choice(what: str, value: T, choices: Iterable[object]) -> T:
    """Return ``value`` if it is one of ``choices``; otherwise a ValueError naming ``what`` and listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")
    return value
