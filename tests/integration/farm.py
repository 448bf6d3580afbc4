"""A box of emulated Ollama instances behind the real proxy, all on 127.0.0.1 sockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ollama
import openai
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.api.clients import runner_options
from proxy.app import build_app
from proxy.config import Config, GpuSpec, config_from_dict
from proxy.emulator.catalogue import Catalogue
from proxy.emulator.clock import RealClock
from proxy.emulator.engine import Engine
from proxy.emulator.events import ServerSettings
from proxy.emulator.server import build_emulator_app
from proxy.emulator.store import ModelStore

GIB = 1024**3


@dataclass
class Farm:
    url: str
    config: Config
    registry: CollectorRegistry
    engines: list[Engine]
    servers: list[TestServer]
    proxy_server: TestServer
    clients: list[ollama.AsyncClient | openai.AsyncOpenAI]

    def ollama(self) -> ollama.AsyncClient:
        """An official ollama client on the proxy, closed with the farm."""
        client = ollama.AsyncClient(host=self.url)
        self.clients.append(client)
        return client

    def openai(self) -> openai.AsyncOpenAI:
        """An official openai client on the proxy's /v1, closed with the farm."""
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused")
        self.clients.append(client)
        return client

    def engine(self, name: str) -> Engine:
        return self.engines[int(name.removeprefix("gpu"))]

    def loaded(self) -> dict[str, list[str]]:
        """Model names loaded per instance, read from the emulators themselves."""
        return {f"gpu{i}": sorted(m.model.name for m in e.ps()) for i, e in enumerate(self.engines)}

    def waiting_inside(self) -> int:
        """Requests queued inside the backends behind busy slots (Ollama's unbounded wait, which
        late binding must keep at zero); waiting for the model's load is not counted."""
        return sum(e.waiting_for_slot() for e in self.engines)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


@contextlib.asynccontextmanager
async def farm(
    tmp_path: Path,
    *,
    gpus: Sequence[float] = (24, 24, 48, 48),
    num_parallel: int = 2,
    policy: str = "vram_queue",
    speed: float = 50.0,
    queue: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    context_length: int = 4096,
    limits: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    stores: str = "shared",
    launcher: str = "emulated",
) -> AsyncIterator[Farm]:
    """Start one emulator per GPU and the proxy in front of them.

    ``stores``: ``shared`` (one model directory, as ``models_dir``) or ``separate`` (each keeps
    its own in memory, as servers on other hosts do). ``launcher``: ``emulated``, or the proxy
    sees them as ``external`` servers with an agent (``external_agent``: their ``/gpus`` is the
    ``gpu_source``) or without any memory source (``external``).
    """
    specs = [GpuSpec(name=f"emu{i}", memory_gib=g) for i, g in enumerate(gpus)]
    catalogue = Catalogue()
    engines: list[Engine] = []
    servers: list[TestServer] = []
    async with contextlib.AsyncExitStack() as stack:
        for spec in specs:
            settings = ServerSettings(
                gpus=(spec,), num_parallel=num_parallel, context_length=context_length
            )
            engine = Engine(settings, RealClock(speed))
            store = ModelStore(tmp_path / "models" if stores == "shared" else None, catalogue)
            server = await emulator_server(stack, engine, store, catalogue)
            engines.append(engine)
            servers.append(server)
        raw = {
            "listen": "127.0.0.1:1",
            "models_dir": str(tmp_path / "models") if stores == "shared" else "",
            "instances": [
                _instance(i, s.port, launcher, num_parallel) for i, s in enumerate(servers)
            ],
            "emulator": {"gpus": [{"name": s.name, "memory_gib": s.memory_gib} for s in specs]},
            "routing": {"policy": policy, **(routing or {})},
            "timeouts": {
                "health_interval": 0.2,
                "health_timeout": 1.0,
                "connect": 1.0,
                **(timeouts or {}),
            },
            "queue": {"timeout": 30, **(queue or {})},
            "limits": limits or {},
            "auth": auth or {},
        }
        config = config_from_dict(raw, source="test")
        registry = CollectorRegistry()
        proxy_server = TestServer(build_app(config, registry=registry), host="127.0.0.1")
        await proxy_server.start_server(**runner_options(config.limits))  # as `ollamux serve`
        stack.push_async_callback(proxy_server.close)
        box = Farm(
            url=str(proxy_server.make_url("")).rstrip("/"),
            config=config,
            registry=registry,
            engines=engines,
            servers=servers,
            proxy_server=proxy_server,
            clients=[],
        )
        try:
            yield box
        finally:
            for client in box.clients:
                await client.close()


def _instance(i: int, port: int, launcher: str, num_parallel: int) -> dict[str, Any]:
    if launcher == "emulated":
        where: dict[str, Any] = {"launcher": "emulated", "gpu": i, "port": port}
    else:
        where = {"launcher": "external", "url": f"http://127.0.0.1:{port}"}
        if launcher == "external_agent":
            where["gpu_source"] = where["url"]  # an emulator serves /gpus as an agent does
    return {"name": f"gpu{i}", "num_parallel": num_parallel, **where}


async def emulator_server(
    stack: contextlib.AsyncExitStack, engine: Engine, store: ModelStore, catalogue: Catalogue
) -> TestServer:
    """An emulated Ollama on a free 127.0.0.1 port, closed with ``stack``."""
    app = build_emulator_app(engine, store, catalogue, version="0.32.15", bind_host="127.0.0.1")
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    stack.push_async_callback(server.close)
    return server
