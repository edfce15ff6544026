"""Typed, frozen config dataclasses: each value checked against its field's annotation, with
errors that name the key, the value and the type expected; overrides and differences."""

from __future__ import annotations

import types
from dataclasses import MISSING, fields, replace
from functools import cache
from typing import Any, Union, get_args, get_origin, get_type_hints

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object",
          list: "a list", type(None): "null"}


def describe(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(hint))
    return _NAMES.get(get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value has the annotated type: an int is a number, a bool is not an integer."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        key, item = get_args(hint)
        return isinstance(value, dict) and all(fits(k, key) and fits(v, item) for k, v in value.items())
    return isinstance(value, origin or hint)


@cache
def field_hints(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def check_types(obj, prefix: str = "") -> None:
    """A ValueError naming the first field of the dataclass ``obj`` whose value is not of its
    annotated type: the key (``prefix`` + name), the value and the type expected."""
    for name, hint in field_hints(type(obj)).items():
        value = getattr(obj, name)
        if not fits(value, hint):
            raise ValueError(f"config key {prefix}{name}: expected {describe(hint)}, got {value!r}")


def defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}


def field_differences(old: dict[str, Any], new: dict[str, Any], ignore=()) -> list[str]:
    """`key: old -> new` for each key of either dict whose values differ (a missing key is None)."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


def with_overrides(base, changes: dict[str, Any], what: str):
    """``base`` (a frozen config dataclass) with the fields in ``changes`` replaced; an unknown
    field is a ValueError naming ``what`` (the config key that held them) and the valid fields."""
    try:
        return replace(base, **changes)
    except TypeError as err:
        raise ValueError(f"{what}: {err}; valid keys: {', '.join(type(base).__dataclass_fields__)}") from None
