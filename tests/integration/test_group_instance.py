"""A group instance (one Ollama over several GPUs, no spread) serves small models next to a big one.

The box of ``ollamux plan`` for 4 x 24 GiB, llama3.3:70b and qwen2.5:32b with 8 users: one emulated
instance over three cards (the 70b splits over them) and one single card (the 32b). A request for
a small model, while both are loaded, goes to the group, where one card has room, rather than to
the single card, where it would evict the 32b; the emulator puts it on one card of the group.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.config import GpuSpec, config_from_dict
from proxy.emulator.catalogue import Catalogue
from proxy.emulator.clock import RealClock
from proxy.emulator.engine import Engine
from proxy.emulator.events import ServerSettings
from proxy.emulator.store import ModelStore
from tests.integration.farm import emulator_server

CARDS = [GpuSpec(name=f"card{i}", memory_gib=24) for i in range(4)]
LAYOUT = {"gpu0-2": CARDS[:3], "gpu3": CARDS[3:]}


@contextlib.asynccontextmanager
async def box(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, Engine]]]:
    catalogue = Catalogue()
    engines: dict[str, Engine] = {}
    instances: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        for name, cards in LAYOUT.items():
            settings = ServerSettings(gpus=tuple(cards), num_parallel=1, context_length=4096)
            engine = Engine(settings, RealClock(50.0))
            store = ModelStore(tmp_path / "models", catalogue)
            server = await emulator_server(stack, engine, store, catalogue)
            engines[name] = engine
            instances.append(
                {
                    "name": name,
                    "launcher": "emulated",
                    "gpu": [c.name for c in cards],
                    "spread": False,
                    "port": server.port,
                    "num_parallel": 1,
                }
            )
        raw = {
            "listen": "127.0.0.1:1",
            "models_dir": str(tmp_path / "models"),
            "instances": instances,
            "emulator": {"gpus": [{"name": c.name, "memory_gib": c.memory_gib} for c in CARDS]},
            "timeouts": {"health_interval": 0.2, "health_timeout": 1.0, "connect": 1.0},
            "queue": {"timeout": 30},
        }
        proxy = TestServer(build_app(config_from_dict(raw, source="test")), host="127.0.0.1")
        await proxy.start_server()
        stack.push_async_callback(proxy.close)
        yield str(proxy.make_url("")).rstrip("/"), engines


async def chat(session: aiohttp.ClientSession, url: str, model: str) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": False,
        "options": {"num_predict": 4},
    }
    async with session.post(url + "/api/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def seen_loaded(session: aiohttp.ClientSession, url: str, want: dict[str, set[str]]) -> None:
    """Wait until the router's picture (``/proxy/status``) shows these models loaded."""
    for _ in range(200):
        async with session.get(url + "/proxy/status") as resp:
            status = await resp.json()
        loaded = {i["name"]: {m["name"] for m in i["loaded"]} for i in status["instances"]}
        if all(want[name] <= loaded.get(name, set()) for name in want):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the router never saw {want}; it sees {loaded}")


async def test_a_small_model_goes_to_a_group_card_with_room_not_to_evict(tmp_path: Path) -> None:
    async with box(tmp_path) as (url, engines), aiohttp.ClientSession() as session:
        await chat(session, url, "llama3.3:70b")  # fits only on the group's three cards
        await chat(session, url, "qwen2.5:32b")
        await seen_loaded(session, url, {"gpu0-2": {"llama3.3:70b"}, "gpu3": {"qwen2.5:32b"}})
        await chat(session, url, "llama3.1:8b")
        group = {m.model.name: m for m in engines["gpu0-2"].ps()}
        single = [r.model.name for r in engines["gpu3"].ps()]
    assert single == ["qwen2.5:32b"]  # nothing evicted there
    assert sorted(group) == ["llama3.1:8b", "llama3.3:70b"]
    assert group["llama3.3:70b"].gpus == (0, 1, 2)  # split over the group
    assert len(group["llama3.1:8b"].gpus) == 1  # the small one on one card of it
    assert group["llama3.1:8b"].size == group["llama3.1:8b"].size_vram  # nothing spilled
