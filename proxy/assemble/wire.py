"""Ollama's wire formats for the assembler: JSON read and written as Go writes it, NDJSON, SSE.

:func:`loads` keeps every non-integer number as the exact text Ollama sent (:class:`Number`), so
:func:`dumps` writes values it passes through (log probabilities, tool arguments) byte for byte;
strings are written with Go's escapes (``<``, ``>``, ``&``, U+2028, U+2029). :class:`Lines` and
:class:`Events` cut a body that arrives in pieces split anywhere into NDJSON lines or SSE ``data``
payloads, in time linear in its size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["Events", "Lines", "Number", "dumps", "field", "loads", "put"]

_GO_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


class Number:
    """A JSON number with a fraction or exponent, kept as the text it was written as."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Number) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Number({self.text!r})"


def loads(text: bytes | str) -> Any:
    """Parse JSON; objects keep their key order, floats (and ``-0``) stay :class:`Number` text."""
    return json.loads(text, parse_float=Number, parse_int=_int)


def _int(text: str) -> int | Number:
    return Number(text) if text == "-0" else int(text)


def dumps(value: Any) -> str:
    """Compact JSON as Go's encoding/json writes it (HTML characters escaped, UTF-8 kept)."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_quote(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, Number):
        out.append(value.text)
    elif isinstance(value, Mapping):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(_quote(str(key)))
            out.append(":")
            _write(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} is not written by the assembler")


def _quote(text: str) -> str:
    quoted = json.dumps(text, ensure_ascii=False)
    for plain, escaped in _GO_ESCAPES:
        if plain in quoted:
            quoted = quoted.replace(plain, escaped)
    return quoted


def field(data: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """Whether a request names ``name`` and its value, matched as Go's decoder matches keys.

    Go folds case (``"Stream"`` sets ``stream``) and the last matching key wins.
    """
    found, value = False, None
    folded = name.casefold()
    for key, item in data.items():
        if key == name or key.casefold() == folded:
            found, value = True, item
    return found, value


def put(obj: dict[str, Any], key: str, value: Any, order: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` with ``key`` set; a new key goes where Go's struct order puts it."""
    if key in obj:
        obj[key] = value
        return obj
    before = set(order[: order.index(key)])
    items = list(obj.items())
    at = 0
    for i, (name, _) in enumerate(items):
        if name in before:
            at = i + 1
    items.insert(at, (key, value))
    return dict(items)


class Lines:
    """NDJSON framing: complete lines out of pieces split anywhere (blank ones dropped or kept)."""

    def __init__(self, *, blank: bool = False) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._blank = blank

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", max(self._scan, start))
            if end < 0:
                break
            line = bytes(self._buf[start:end])
            if self._blank or line.strip():
                lines.append(line)
            start = end + 1
        if start:
            del self._buf[:start]
        self._scan = len(self._buf)  # a long line is searched once, not once per piece
        return lines

    def tail(self) -> bytes:
        """What is left after the last newline (a last line without one); emptied."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return rest if rest.strip() else b""


class Events:
    """Server-sent events: the ``data`` payload of each complete event."""

    def __init__(self) -> None:
        self._lines = Lines(blank=True)
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        events: list[str] = []
        for raw in self._lines.feed(chunk):
            line = raw.decode("utf-8", errors="replace").removesuffix("\r")
            if not line:  # a blank line ends the event
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
            # event:, id:, retry: and comment lines carry nothing the assembler needs
        return events
