"""Settings are checked in one place: each stage's settings dataclass calls `check` from `__post_init__`.

`check` holds every field to its type hint (numbers, choices written as `Literal`, tuples, paths), so a choice
is declared once, in the hint, and a TOML file, the Python API and a benchmark's overrides meet the same rules.
The few rules a type cannot say (ranges, fields that go together) are written beside the fields with `require`.
A failed rule raises `SettingError` naming the field, which the pipeline loader turns into the file's line."""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from pathlib import Path


class SettingError(ValueError):
    """A setting outside what its field allows; `key` names the field (for the pipeline file's line)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def require(ok: bool, key: str, message: str) -> None:
    """A rule the type hint cannot state: raise `SettingError(key, message)` unless `ok`."""
    if not ok:
        raise SettingError(key, message)


@functools.cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def check(settings: object) -> None:
    """Hold every field of a frozen settings dataclass to its type hint, normalising in place: arrays become
    tuples, integers given for floats become floats, strings given for paths become `Path`."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        try:
            normal = coerce(value, hints[f.name])
        except (TypeError, ValueError) as exc:
            raise SettingError(f.name, str(exc)) from None
        if normal is not value:
            object.__setattr__(settings, f.name, normal)


def choices(hint: object) -> tuple:
    """The values a `Literal` hint allows (for messages and for code that lists them)."""
    return typing.get_args(hint)


def coerce(value: object, hint: object) -> object:
    """`value` checked against `hint` and normalised; TypeError or ValueError saying what was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return coerce(value, option)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(" or ".join(errors))
    if hint is type(None):
        if value is not None:
            raise TypeError(f"expected nothing, got {value!r}")
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected an array, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a) for v, a in zip(value, args))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"expected a number, got {value!r}")
        return value if type(value) is float else float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"expected an integer, got {value!r}")
        return value if type(value) is int else int(value)
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise TypeError(f"expected {hint.__name__}, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise TypeError(f"expected a path string, got {value!r}")
        return value if isinstance(value, Path) else Path(value)
    return value
