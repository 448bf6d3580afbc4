"""`ollamux serve`'s event loop: uvloop where installed, asyncio's when asked or missing."""

from __future__ import annotations

import builtins
from typing import Any

import pytest

from proxy import eventloop


async def _which() -> str:
    return eventloop.name()


def test_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.run(_which()) == "uvloop"


def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.run(_which()) == "asyncio"


def test_asyncio_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv(eventloop.ENV, "uvloop")
    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert eventloop.run(_which()) == "asyncio"
