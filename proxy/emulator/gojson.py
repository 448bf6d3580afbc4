"""Request bodies read the way Ollama's Go code reads them, with Go's error texts.

:func:`decode` checks a body with Go's ``encoding/json`` grammar and messages (``unexpected EOF``,
``invalid character 'x' looking for beginning of value``), matches keys case-insensitively to the
fields of a :class:`GoType` struct and reports the first wrong type as ``json: cannot unmarshal
number into Go struct field GenerateRequest.prompt of type string``. The writing side (Go's JSON
output, times, durations) is in :mod:`proxy.emulator.goformat`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.emulator.goformat import go_quote
from proxy.errors import BadRequest
from proxy.units import DurationError, parse_duration

__all__ = [
    "ANY",
    "BOOL",
    "BYTES",
    "DURATION",
    "FLOAT",
    "INT",
    "STRING",
    "THINK",
    "GoType",
    "decode",
    "get_str",
    "map_of",
    "slice_of",
    "struct_of",
]


# --- Go types as encoding/json sees them -----------------------------------------------------


@dataclass(frozen=True)
class GoType:
    """A Go type: which JSON it accepts (``kind``) and how error messages name it (``go``)."""

    go: str
    kind: str
    """string, bool, int, float, any, bytes, duration, think, slice, map or struct."""
    elem: GoType | None = None
    fields: tuple[tuple[str, GoType], ...] = ()
    name: str = ""
    """A struct's name without its package, as error messages print it."""


STRING = GoType("string", "string")
BOOL = GoType("bool", "bool")
INT = GoType("int", "int")
FLOAT = GoType("float64", "float")
ANY = GoType("interface {}", "any")
BYTES = GoType("api.ImageData", "bytes")
DURATION = GoType("api.Duration", "duration")
THINK = GoType("api.ThinkValue", "think")


def slice_of(elem: GoType, go: str = "") -> GoType:
    return GoType(go or f"[]{elem.go}", "slice", elem)


def map_of(elem: GoType) -> GoType:
    return GoType(f"map[string]{elem.go}", "map", elem)


def struct_of(qualified: str, **fields: GoType) -> GoType:
    """``struct_of("api.GenerateRequest", model=STRING, ...)``; keys are the JSON names."""
    return GoType(qualified, "struct", fields=tuple(fields.items()), name=qualified.split(".")[-1])


_ZERO: dict[str, object] = {"string": "", "bytes": "", "bool": False, "int": 0, "float": 0.0}
"""Go's zero values: what a JSON null (or a value of the wrong type) leaves in a slice."""


class _GoFloat(float):
    """A JSON number that had a fraction or exponent, keeping its text for Go's messages."""

    text: str

    def __new__(cls, text: str) -> _GoFloat:
        value = super().__new__(cls, text)
        value.text = text
        return value


# --- the syntax check: Go's scanner, with its messages ---------------------------------------

_WS = " \t\r\n"
_HEX = "0123456789abcdefABCDEF"


class _Syntax(Exception):
    pass


def _quote_char(c: str) -> str:
    """Go's ``quoteChar``: how the scanner prints the byte it did not expect."""
    byte = c.encode("utf-8")[0]
    if c == "'":
        return "'\\''"
    if c == '"':
        return "'\"'"
    return "'" + go_quote(chr(byte))[1:-1] + "'"


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, context: str) -> _Syntax:
        return _Syntax(f"invalid character {_quote_char(self.s[self.i])} {context}")

    def peek(self) -> str:
        while self.i < len(self.s) and self.s[self.i] in _WS:
            self.i += 1
        if self.i >= len(self.s):
            raise _Syntax("unexpected EOF")
        return self.s[self.i]

    def value(self) -> None:
        c = self.peek()
        if c == "{":
            self.composite("}", self.member, "after object key:value pair")
        elif c == "[":
            self.composite("]", self.value, "after array element")
        elif c == '"':
            self.string()
        elif c == "-" or (c.isascii() and c.isdigit()):
            self.number()
        elif c in "tfn":
            word = {"t": "true", "f": "false", "n": "null"}[c]
            for expected in word[1:]:
                self.i += 1
                if self.i >= len(self.s):
                    raise _Syntax("unexpected EOF")
                if self.s[self.i] != expected:
                    raise self.fail(f"in literal {word} (expecting {_quote_char(expected)})")
            self.i += 1
        else:
            raise self.fail("looking for beginning of value")

    def composite(self, close: str, item: Any, after: str) -> None:
        self.i += 1
        if self.peek() == close:
            self.i += 1
            return
        while True:
            item()
            c = self.peek()
            self.i += 1
            if c == close:
                return
            if c != ",":
                self.i -= 1
                raise self.fail(after)

    def member(self) -> None:
        if self.peek() != '"':
            raise self.fail("looking for beginning of object key string")
        self.string()
        if self.peek() != ":":
            raise self.fail("after object key")
        self.i += 1
        self.value()

    def string(self) -> None:
        self.i += 1
        while True:
            c = self.next()
            if c == '"':
                return
            if c == "\\":
                c = self.next()
                if c == "u":
                    for _ in range(4):
                        if self.next() not in _HEX:
                            self.i -= 1
                            raise self.fail("in \\u hexadecimal character escape")
                elif c not in '"\\/bfnrt':
                    self.i -= 1
                    raise self.fail("in string escape code")
            elif c < " ":
                self.i -= 1
                raise self.fail("in string literal")

    def next(self) -> str:
        if self.i >= len(self.s):
            raise _Syntax("unexpected EOF")
        self.i += 1
        return self.s[self.i - 1]

    def digits(self, context: str) -> None:
        if self.i >= len(self.s):
            raise _Syntax("unexpected EOF")
        if not (self.s[self.i].isascii() and self.s[self.i].isdigit()):
            raise self.fail(context)
        while self.i < len(self.s) and self.s[self.i].isascii() and self.s[self.i].isdigit():
            self.i += 1

    def number(self) -> None:
        if self.s[self.i] == "-":
            self.i += 1
        if self.i < len(self.s) and self.s[self.i] == "0":
            self.i += 1
        else:
            self.digits("in numeric literal")
        if self.i < len(self.s) and self.s[self.i] == ".":
            self.i += 1
            self.digits("after decimal point in numeric literal")
        if self.i < len(self.s) and self.s[self.i] in "eE":
            self.i += 1
            if self.i < len(self.s) and self.s[self.i] in "+-":
                self.i += 1
            self.digits("in exponent of numeric literal")


# --- decoding into a struct ------------------------------------------------------------------


class _TypeErrors:
    """Go keeps decoding after a wrong type and reports the first one at the end."""

    def __init__(self) -> None:
        self.first: str | None = None

    def add(self, value: object, target: GoType, struct: str, path: tuple[str, ...]) -> None:
        if self.first is not None:
            return
        where = f"Go struct field {struct}.{'.'.join(path)}" if path else "Go value"
        self.first = f"json: cannot unmarshal {_json_kind(value)} into {where} of type {target.go}"


def decode(body: bytes, target: GoType, *, empty: str = "missing request body") -> dict[str, Any]:
    """Parse ``body`` into the fields of struct ``target`` (JSON names, nulls dropped).

    Raises BadRequest with Go's text: ``empty`` for a blank body (Ollama says ``missing request
    body``, its OpenAI layer ``EOF``), the scanner's message for bad syntax, the first type error.
    """
    text = body.decode("utf-8", errors="replace")
    if not text.strip(_WS):
        raise BadRequest(empty)
    scanner = _Scanner(text)
    try:
        scanner.value()  # like json.Decoder: one value, anything after it is not read
    except _Syntax as exc:
        raise BadRequest(str(exc)) from None
    raw = json.loads(text[: scanner.i], parse_float=_GoFloat)
    errors = _TypeErrors()
    out = _convert(raw, target, errors, target.name, ())
    if errors.first is not None:
        raise BadRequest(errors.first)
    return out if isinstance(out, dict) else {}


def _convert(value: Any, t: GoType, errors: _TypeErrors, struct: str, path: tuple[str, ...]) -> Any:
    if value is None:
        return None
    kind = t.kind
    if kind == "any":
        return value
    if kind == "duration":
        try:
            return parse_duration(value)
        except DurationError as exc:
            raise BadRequest(_go_type_names(str(exc))) from None
    if kind == "think":
        return _think(value)
    if kind == "struct":
        if not isinstance(value, dict):
            errors.add(value, t, struct, path)
            return None
        return _struct(value, t, errors, path)
    if kind == "slice":
        if not isinstance(value, list):
            errors.add(value, t, struct, path)
            return None
        assert t.elem is not None
        items = [_convert(v, t.elem, errors, struct, path) for v in value]
        return [_zero(t.elem) if item is None else item for item in items]
    if kind == "map":
        if not isinstance(value, dict):
            errors.add(value, t, struct, path)
            return None
        assert t.elem is not None
        return {k: _convert(v, t.elem, errors, struct, path) for k, v in value.items()}
    if _scalar_ok(value, kind):
        if kind == "bytes":
            _check_base64(value)
        return float(value) if kind == "float" else value
    errors.add(value, t, struct, path)
    return None


def _struct(
    value: dict[str, Any], t: GoType, errors: _TypeErrors, path: tuple[str, ...]
) -> dict[str, Any]:
    fields = dict(t.fields)
    folded = {name.lower(): name for name in fields}
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = key if key in fields else folded.get(key.lower())
        if name is None:
            continue  # Go ignores unknown keys
        converted = _convert(item, fields[name], errors, t.name, (*path, name))
        if converted is None:
            out.pop(name, None)
        else:
            out[name] = converted
    return out


def _zero(t: GoType) -> object:
    return {} if t.kind == "struct" else _ZERO.get(t.kind)


def _scalar_ok(value: object, kind: str) -> bool:
    if kind in ("string", "bytes"):
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "int":
        return (
            isinstance(value, int) and not isinstance(value, _GoFloat) and -(2**63) <= value < 2**63
        )
    return kind == "float" and math.isfinite(value)


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, _GoFloat):
        return f"number {value.text}"
    if isinstance(value, int):
        return "number" if -(2**63) <= value < 2**63 else f"number {value}"
    if isinstance(value, float):
        return "number"
    names: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), "value")


def _go_type_names(message: str) -> str:
    """Python type names in proxy.units' messages, as Go's ``reflect.TypeOf`` prints them."""
    for py, go in (("'list'", "'[]interface {}'"), ("'dict'", "'map[string]interface {}'")):
        message = message.replace(py, go)
    return message


def _think(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value not in ("high", "medium", "low", "max"):
            raise BadRequest(
                f'invalid think value: {go_quote(value)} (must be "high", "medium", "low", '
                '"max", true, or false)'
            )
        return value
    raise BadRequest(
        'think must be a boolean or string ("high", "medium", "low", "max", true, or false)'
    )


def _check_base64(value: str) -> None:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        bad = next(
            (i for i, c in enumerate(value) if not (c.isascii() and (c.isalnum() or c in "+/="))),
            len(value) - len(value) % 4 if len(value) % 4 else max(len(value) - 1, 0),
        )
        raise BadRequest(f"illegal base64 data at input byte {bad}") from None


def get_str(fields: Mapping[str, Any], *names: str) -> str:
    """The first non-empty string among ``names`` (Ollama's ``cmp.Or(req.Model, req.Name)``)."""
    for name in names:
        value = fields.get(name)
        if isinstance(value, str) and value:
            return value
    return ""
