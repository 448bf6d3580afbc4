"""Durations and sizes as Ollama writes them: Go ``time.ParseDuration`` and byte units."""

from __future__ import annotations

import math
import re

FOREVER = math.inf
"""A negative keep-alive: the model stays loaded until it is evicted or the server stops."""

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)([a-z\u00b5\u03bc]*)")


class DurationError(ValueError):
    """A duration that Go's ``time.ParseDuration`` (or Ollama's env parsing) would reject."""


def parse_go_duration(text: str) -> float:
    """Parse like Go's ``time.ParseDuration``, returning seconds; errors carry Go's wording."""
    original = text
    if text in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if text and text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if not text:
        raise DurationError(f'time: invalid duration "{original}"')
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise DurationError(f'time: invalid duration "{original}"')
        number, unit = match.groups()
        if not unit:
            raise DurationError(f'time: missing unit in duration "{original}"')
        if unit not in _UNITS:
            raise DurationError(f'time: unknown unit "{unit}" in duration "{original}"')
        total += float(number) * _UNITS[unit]
        pos = match.end()
    return sign * total


def parse_duration(value: object, *, env_style: bool = False) -> float:
    """Seconds from a number (seconds) or a Go duration string; negative becomes FOREVER.

    ``env_style`` also accepts a bare integer string as seconds, as ``OLLAMA_KEEP_ALIVE`` does.
    """
    if isinstance(value, bool):
        raise DurationError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().strip("\"'")
        if env_style and re.fullmatch(r"[+-]?\d+", text):
            seconds = float(int(text))
        else:
            seconds = parse_go_duration(text)
    else:
        raise DurationError(f"Unsupported type: '{type(value).__name__}'")
    return FOREVER if seconds < 0 else seconds


_SIZE = re.compile(r"(\d+\.?\d*|\.\d+)\s*([a-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


class SizeError(ValueError):
    """A size that is not a byte count nor a number with a byte unit."""


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as ``64MiB``, ``1.5GiB``, ``500MB`` or ``1048576``.

    ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024, ``KB``/``MB``/``GB``/``TB`` powers of 1000
    (as Ollama writes sizes); units are case-insensitive.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SizeError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        number, factor = float(value), 1
    else:
        match = _SIZE.fullmatch(value.strip().lower())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise SizeError(f"not a size: {value!r}")
        number, factor = float(match.group(1)), _SIZE_UNITS[match.group(2)]
    if number < 0 or math.isinf(number) or math.isnan(number):
        raise SizeError(f"not a size: {value!r}")
    return int(number * factor)


def format_bytes(n: float) -> str:
    """Human size with binary units, e.g. ``23.6 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
