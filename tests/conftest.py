"""Shared fixtures: an emulated Ollama on a real loopback socket, time compressed 200x.

``make_emulator(models=..., gpus=..., root=..., **server_settings)`` starts one per call (each test
may start several, e.g. two sharing a model directory); ``emulator`` is one with the defaults.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpServer

from proxy.config import GpuSpec, ModelSpec
from proxy.emulator.catalogue import Catalogue
from proxy.emulator.clock import RealClock
from proxy.emulator.engine import Engine
from proxy.emulator.events import ServerSettings
from proxy.emulator.server import build_emulator_app
from proxy.emulator.store import ModelStore
from tests.processes import Spawn, spawner

SPEED = 200.0
"""Virtual seconds per real second: a 1.6 s model load takes 8 ms."""
VERSION = "0.32.15"

TINY = ModelSpec(name="tiny:latest", size_gb=1.0, parameters="1.0B", decode_tps=2000,
                 prompt_tps=20000, load_gbps=10, kv_kib_per_token=16,
                 context_length=8192)  # fmt: skip
VISION = ModelSpec(name="vision:2b", size_gb=2.0, parameters="2.0B", decode_tps=1000,
                   prompt_tps=20000, load_gbps=10, kv_kib_per_token=16, family="gemma3",
                   capabilities=("completion", "vision"))  # fmt: skip
EMBED = ModelSpec(name="embed:latest", size_gb=0.3, parameters="137M", context_length=64,
                  prompt_tps=50000, load_gbps=10, kv_kib_per_token=8, family="nomic-bert",
                  quantization="F16", embedding=True, embedding_length=16)  # fmt: skip
REMOTE = ModelSpec(name="remote:1b", size_gb=0.4, parameters="1.0B", decode_tps=2000,
                   load_gbps=10, kv_kib_per_token=16, pulled=False)  # fmt: skip
MODELS = (TINY, VISION, EMBED, REMOTE)
GPU = GpuSpec(name="rtx4090", memory_gib=24)


@dataclass
class Emulator:
    """A running emulated server and the objects behind it."""

    url: str
    engine: Engine
    store: ModelStore


MakeEmulator = Callable[..., Awaitable[Emulator]]


@pytest.fixture
async def make_emulator(aiohttp_server: AiohttpServer) -> MakeEmulator:
    async def make(
        *,
        models: tuple[ModelSpec, ...] = MODELS,
        gpus: tuple[GpuSpec, ...] = (GPU,),
        root: Path | None = None,
        bind_host: str = "127.0.0.1",
        origins: tuple[str, ...] = (),
        **settings: Any,
    ) -> Emulator:
        catalogue = Catalogue(models)
        engine = Engine(ServerSettings(gpus=gpus, **settings), RealClock(SPEED))
        store = ModelStore(root, catalogue)
        app = build_emulator_app(
            engine, store, catalogue, version=VERSION, bind_host=bind_host, origins=origins
        )
        server = await aiohttp_server(app)
        return Emulator(url=str(server.make_url("")).rstrip("/"), engine=engine, store=store)

    return make


@pytest.fixture
async def emulator(make_emulator: MakeEmulator) -> Emulator:
    return await make_emulator()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `ollamux ARGS` in the background with its output in a file; killed at the end."""
    yield from spawner(tmp_path)
