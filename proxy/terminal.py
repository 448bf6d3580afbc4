"""Plain-ANSI drawing for `ollamux status`: colour, columns, rows cut to width, alternate screen.

No library: a handful of escape sequences keep `ollamux status` quick to start. Everything here
works on strings that may carry SGR colour codes, measuring only what the terminal shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import TextIO

CLEAR = "\x1b[H\x1b[2J"
"""Cursor home and clear screen: each --watch frame replaces the last one."""
ENTER = "\x1b[?1049h\x1b[?25l"
"""Switch to the alternate screen (the shell's scrollback stays untouched) and hide the cursor."""
LEAVE = "\x1b[?25h\x1b[?1049l"
"""Show the cursor again and return to the normal screen, as it was before."""
RESET = "\x1b[0m"
BOLD, DIM, RED, GREEN, YELLOW, CYAN = "1", "2", "31", "32", "33", "36"

_SGR = re.compile(r"(\x1b\[[0-9;]*m)")
Style = Callable[[str], str]
"""A cell's text to its SGR colour code ("" for none)."""


def is_tty(out: TextIO) -> bool:
    """Whether ``out`` is a terminal (a closed or odd stream is not)."""
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def colour_wanted(tty: bool) -> bool:
    """Colour only on a terminal, and not when ``NO_COLOR`` is set (non-empty) or ``TERM=dumb``."""
    return tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def terminal_size() -> tuple[int, int]:
    """Columns and rows of the terminal (80x24 when it cannot be told)."""
    size = shutil.get_terminal_size((80, 24))
    return max(size.columns, 20), max(size.lines, 5)


def paint(text: str, sgr: str, on: bool = True) -> str:
    """``text`` in the SGR style ``sgr`` (e.g. ``GREEN``, ``"1;31"``); as is when off or empty."""
    return f"\x1b[{sgr}m{text}{RESET}" if on and sgr and text else text


def plain(line: str) -> str:
    """``line`` without its colour codes."""
    return _SGR.sub("", line)


def visible_len(line: str) -> int:
    """Columns that ``line`` takes on screen, its colour codes not counted."""
    return len(plain(line))


def cut(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible columns; a cut coloured line still ends in a reset."""
    if visible_len(line) <= width:
        return line
    kept: list[str] = []
    left = width
    coloured = False
    for part in _SGR.split(line):
        if _SGR.fullmatch(part):
            kept.append(part)
            coloured = True
        elif left > 0:
            kept.append(part[:left])
            left -= len(kept[-1])
    return "".join(kept) + (RESET if coloured else "")


@contextlib.contextmanager
def alternate_screen(out: TextIO) -> Iterator[None]:
    """The alternate screen with the cursor hidden; left, cursor shown, on any exit (Ctrl-C too)."""
    out.write(ENTER)
    out.flush()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):  # a closed terminal cannot be restored
            out.write(LEAVE)
            out.flush()


def columns(
    header: list[str],
    rows: list[list[str]],
    *,
    styles: Mapping[int, Style] | None = None,
    colour: bool = False,
) -> list[str]:
    """Columns padded to their widest cell; ``colour``: a bold header, cells styled by column."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    styles = styles or {}

    def line(row: list[str], first: bool) -> str:
        cells = (
            paint(cell, BOLD if first else styles[i](cell) if i in styles else "", colour)
            + " " * (w - len(cell))
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return [line(row, i == 0) for i, row in enumerate([header, *rows])]


def can_draw(out: TextIO) -> bool:
    """Whether ``out`` can encode the block characters of the memory bars."""
    try:
        "█░".encode(getattr(out, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def ascii_blocks(text: str) -> str:
    """``text`` with the bars' block characters as ``#`` and ``.``."""
    return text.replace("█", "#").replace("░", ".")
