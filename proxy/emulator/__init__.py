"""A faithful fake Ollama server: scheduler engine, model store and HTTP layer.

Names are imported on first use, so ``proxy.emulator.launch`` (config checks, CLI parsing) does not
pull in the HTTP application.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.emulator.catalogue import Catalogue
    from proxy.emulator.clock import Clock, ManualClock, RealClock
    from proxy.emulator.engine import Engine
    from proxy.emulator.events import Faults, ServerSettings
    from proxy.emulator.server import build_emulator_app, run_emulator
    from proxy.emulator.store import ModelStore, StoredModel

__all__ = [
    "Catalogue",
    "Clock",
    "Engine",
    "Faults",
    "ManualClock",
    "ModelStore",
    "RealClock",
    "ServerSettings",
    "StoredModel",
    "build_emulator_app",
    "run_emulator",
]

_HOMES = {
    "Catalogue": "catalogue",
    "Clock": "clock",
    "ManualClock": "clock",
    "RealClock": "clock",
    "Engine": "engine",
    "Faults": "events",
    "ServerSettings": "events",
    "build_emulator_app": "server",
    "run_emulator": "server",
    "ModelStore": "store",
    "StoredModel": "store",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
