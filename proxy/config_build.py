"""Builds a frozen dataclass tree from parsed YAML by its annotations, checking keys and types.

One generic converter for every config section: unknown keys get a suggestion, wrong types name
what was found, ``Duration``- and ``Size``-annotated fields accept ``5m`` and ``64MiB``, and every
error is a :class:`~proxy.errors.ConfigError` whose path names the field (``instances[2].port``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from proxy.errors import ConfigError
from proxy.units import DurationError, SizeError, parse_duration, parse_size

__all__ = ["build", "check", "strip_path", "unique"]


NOT_FROM_YAML = frozenset({"source", "warnings"})
"""Fields the loader sets (where the config came from, what it warns about), never YAML keys."""


def build(cls: type[Any], raw: object, path: str) -> Any:
    """Build dataclass ``cls`` from a YAML mapping, checking keys and types against annotations.

    A key in the class's ``RETIRED`` mapping (old name -> what replaced it) gets that as its fix.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"must be a mapping, got {_kind(raw)}", path=path or "(top level)")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in NOT_FROM_YAML}
    kwargs: dict[str, Any] = {}
    problems: list[ConfigError] = []  # independent fields: every one is checked and reported
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        try:
            kwargs[key] = _field(cls, fields, hints, key, value, key_path)
        except ConfigError as exc:
            problems.append(exc)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{path}.{missing[0]}" if path else missing[0]
        needs = f"is required ({cls.__name__} needs {', '.join(missing)})"
        problems.append(ConfigError(needs, path=where))
    if problems:
        raise ConfigError.of(problems)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.path and not exc.source:
            sub = f"{path}.{exc.path}" if path else exc.path
            raise ConfigError(strip_path(exc), path=sub) from None
        raise


def _field(
    cls: type[Any],
    fields: dict[str, dataclasses.Field[Any]],
    hints: dict[str, Any],
    key: object,
    value: object,
    key_path: str,
) -> Any:
    """One key of a mapping: a retired or unknown key is an error, else its converted value."""
    retired = getattr(cls, "RETIRED", {}).get(key)
    if retired:
        raise ConfigError(f"is no longer a setting: {retired}", path=key_path)
    if key not in fields:
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown key {key!r}; {hint}", path=key_path)
    return _convert(hints[str(key)], value, key_path)


def _convert(tp: Any, value: object, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        if "duration" in args[1:]:
            try:
                return parse_duration(value, env_style=True)
            except DurationError as exc:
                raise ConfigError(f"{exc}; use e.g. 30s, 5m or 1h", path=path) from None
        if "size" in args[1:]:
            try:
                return parse_size(value)
            except SizeError as exc:
                fix = "use e.g. 64MiB, 1GiB or a byte count"
                raise ConfigError(f"{exc}; {fix}", path=path) from None
        return _convert(args[0], value, path)
    if origin is Literal:
        if value not in args:
            options = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{value!r} is not one of {options}", path=path)
        return value
    if origin in (Union, types.UnionType):
        errors = []
        # a scalar where a list is expected means a list of one (e.g. `gpu: 0`)
        for arg in args:
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if any(typing.get_origin(a) is tuple for a in args) and not isinstance(value, list):
            raise errors[-1]
        raise errors[0]
    if origin is tuple:
        item_type = args[0]
        if not isinstance(value, list):
            if item_type in (int, str) or typing.get_origin(item_type) in (Union, types.UnionType):
                return (_convert(item_type, value, path),)
            raise ConfigError(f"must be a list, got {_kind(value)}", path=path)
        items, problems = [], []
        for i, v in enumerate(value):
            try:
                items.append(_convert(item_type, v, f"{path}[{i}]"))
            except ConfigError as exc:
                problems.append(exc)
        if problems:
            raise ConfigError.of(problems)
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping, got {_kind(value)}", path=path)
        return {str(k): _scalar_str(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    return _scalar(tp, value, path)


def _scalar(tp: Any, value: object, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"must be true or false, got {_kind(value)}", path=path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"must be an integer, got {_kind(value)}", path=path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"must be a number, got {_kind(value)}", path=path)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"must be a string, got {_kind(value)}", path=path)
    raise TypeError(f"config field type {tp!r} is not supported")  # a bug in this module


def _scalar_str(value: object, path: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    raise ConfigError(f"must be a string, got {_kind(value)}", path=path)


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a mapping"})
    shown = repr(value) if isinstance(value, (bool, int, float, str)) else ""
    return f"{names.get(type(value), type(value).__name__)} {shown}".strip()


def strip_path(exc: ConfigError) -> str:
    """The error's message without its leading ``path: `` (to prefix a longer path)."""
    text = str(exc)
    prefix = f"{exc.path}: "
    return text[len(prefix) :] if exc.path and text.startswith(prefix) else text


def check(ok: bool, path: str, message: str) -> None:
    """A ConfigError at ``path`` (relative to the section) unless ``ok``."""
    if not ok:
        raise ConfigError(message, path=path)


def unique(values: list[str], path: str, key: str) -> None:
    """A ConfigError naming the second of two list items with the same ``key``."""
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in seen:
            raise ConfigError(
                f"{value!r} is already used by {path}[{seen[value]}]; each {key} must be unique",
                path=f"{path}[{i}].{key}",
            )
        seen[value] = i
