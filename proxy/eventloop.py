"""Which event loop `ollamux serve` runs: uvloop where it is installed, asyncio's own otherwise.

uvloop (libuv under asyncio's API) spends less CPU per relayed chunk than the default loop. It is a
dependency on CPython/Linux, but the proxy never needs it: when it cannot be imported, or
``OLLAMUX_EVENT_LOOP=asyncio`` is set (to compare, or to rule it out), asyncio's loop runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("ollamux.loop")
T = TypeVar("T")
ENV = "OLLAMUX_EVENT_LOOP"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop where available; logs which loop runs."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in ("", "uvloop", "asyncio"):
        log.warning("%s=%s is neither uvloop nor asyncio; using the default", ENV, choice)
        choice = ""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                log.warning("%s=uvloop but uvloop is not installed; using asyncio's loop", ENV)
        else:
            log.info("event loop: uvloop")
            return uvloop.run(main)
    log.info("event loop: asyncio")
    return asyncio.run(main)


def name() -> str:
    """The running loop's kind: ``uvloop`` or ``asyncio``."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
