"""JSON and times written the way Ollama's Go code writes them.

:func:`dumps` is compact JSON with ``<``, ``>`` and ``&`` escaped as Go's encoding/json does;
:class:`Raw` embeds pre-rendered JSON (float32 vectors, see :func:`float32_text`); :func:`rfc3339`
and :func:`ns` give Ollama's timestamps and durations; :func:`go_quote` is Go's ``%q``.
"""

from __future__ import annotations

import json
import math
import struct
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

__all__ = ["FOREVER", "Raw", "dumps", "float32_text", "go_quote", "ns", "rfc3339"]

FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
"""Go's MaxInt64 nanoseconds (2562047h47m16.854775807s): how Ollama stores keep_alive forever."""


class Raw:
    """Pre-rendered JSON text that :func:`dumps` inserts as it is (e.g. float32 vectors)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def dumps(value: Any) -> str:
    """Compact JSON as Go's encoding/json writes it (HTML characters escaped, UTF-8 kept)."""
    raws: list[str] = []

    def default(obj: object) -> str:
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    out = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=default)
    for plain, escaped in _ESCAPES:
        out = out.replace(plain, escaped)
    for i, text in enumerate(raws):
        out = out.replace(f'"\\u0000raw{i}\\u0000"', text, 1)
    return out


def float32_text(x: float) -> str:
    """A float32 the way Go prints it: the shortest digits that read back as the same float32."""
    (v,) = struct.unpack("<f", struct.pack("<f", x))
    if v == 0 or not math.isfinite(v):
        return "-0" if math.copysign(1, v) < 0 and v == 0 else "0"
    for digits in range(1, 10):
        text = f"{v:.{digits - 1}e}"
        if struct.unpack("<f", struct.pack("<f", float(text)))[0] == v:
            break
    mantissa, exp_text = text.split("e")
    exp = int(exp_text)
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    if exp < -6 or exp >= 21:
        return f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return format(Decimal(f"{mantissa}e{exp}"), "f")


def rfc3339(moment: datetime) -> str:
    """Go's RFC3339Nano in UTC: fraction without trailing zeros, ``Z``."""
    moment = moment.astimezone(timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def ns(seconds: float) -> int:
    """Seconds as Ollama's integer nanoseconds (a Go time.Duration)."""
    if not math.isfinite(seconds):
        return 2**63 - 1
    return int(seconds * 1e9)


def go_quote(text: str) -> str:
    """Go's ``%q``: a double-quoted string with Go's escapes, printable Unicode kept."""
    short = {
        "\a": "\\a",
        "\b": "\\b",
        "\f": "\\f",
        "\n": "\\n",
        "\r": "\\r",
        "\t": "\\t",
        "\v": "\\v",
        "\\": "\\\\",
        '"': '\\"',
    }
    out = []
    for c in text:
        if c in short:
            out.append(short[c])
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x80:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'
