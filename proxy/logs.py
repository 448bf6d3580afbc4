"""Logging of every `ollamux` command: one ``ollamux.*`` namespace, logfmt or JSON lines on stderr.

A logfmt line is ``time=2026-12-07T19:06:05.123+00:00 level=INFO logger=ollamux.proxy msg="..."``;
a message that already is ``key=value`` pairs (the access log) follows the logger as it is. JSON
is one object a line with ``time``, ``level``, ``logger`` and ``message``. Under journald
(``$JOURNAL_STREAM`` set) there is no ``time``: the journal stamps each line itself.

:class:`AccessLogger` makes aiohttp's per-request line (the emulator's) a ``key=value`` line on
``ollamux.emulator.access`` instead of aiohttp's Apache-style one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Literal, TextIO

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

__all__ = [
    "AccessLogger",
    "LogFormatter",
    "child_line",
    "current_format",
    "logfmt_value",
    "setup_logging",
]

LogFormat = Literal["logfmt", "json"]

_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+\-]{1,200}")
_PAIR = r'[a-z_]+=(?:"(?:[^"\\]|\\.)*"|[^\s"=]*)'
_PAIRS = re.compile(f"{_PAIR}(?: {_PAIR})*")
"""A message that is already ``key=value`` pairs, values bare or JSON-quoted."""


def logfmt_value(value: object) -> str:
    """``value`` as it stands in a logfmt line: bare when plain, else a JSON string."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class LogFormatter(logging.Formatter):
    """One line per record, logfmt or JSON, with an ISO-8601 local time and UTC offset (or none)."""

    def __init__(self, fmt: LogFormat = "logfmt", *, timestamps: bool = True) -> None:
        super().__init__()
        self.kind = fmt
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        stamp = datetime.fromtimestamp(record.created).astimezone()
        time = stamp.isoformat(timespec="milliseconds")
        if self.kind == "json":
            entry = {"time": time} if self.timestamps else {}
            entry |= {"level": record.levelname, "logger": record.name, "message": message}
            return json.dumps(entry, ensure_ascii=False)
        head = f"time={time} " if self.timestamps else ""
        head += f"level={record.levelname} logger={record.name} "
        if _PAIRS.fullmatch(message):
            return head + message
        return head + "msg=" + logfmt_value(message)


def setup_logging(
    level: str = "info",
    fmt: LogFormat = "logfmt",
    *,
    environ: Mapping[str, str],
    stream: TextIO | None = None,
) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) as ``fmt`` lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogFormatter(fmt, timestamps=not environ.get("JOURNAL_STREAM")))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def current_format() -> LogFormat:
    """The format :func:`setup_logging` chose for this process (logfmt when it was not called)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, LogFormatter):
            return "json" if handler.formatter.kind == "json" else "logfmt"
    return "logfmt"


def child_line(name: str, line: str, fmt: LogFormat) -> str:
    """A line a supervised instance printed, as ``serve`` shows it: ``NAME | line`` for people,
    or one JSON object naming the instance (the child's own JSON object when it wrote one)."""
    if fmt != "json":
        return f"{name} | {line}"
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        entry = {"level": "INFO", "logger": "ollamux.instance", "message": line}
    return json.dumps({"instance": name.strip(), **entry}, ensure_ascii=False)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log as one ``key=value`` line per request (the emulator's)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields = (
            ("remote", request.remote or "-"),
            ("method", request.method),
            ("path", request.path),
            ("status", response.status),
            ("duration", f"{time:.3f}"),
        )
        self.logger.info(" ".join(f"{k}={logfmt_value(v)}" for k, v in fields))
