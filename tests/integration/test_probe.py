"""The monitor against real in-process emulators: probes of ejected instances, going down, /api/ps.

The ejection back-off runs on an injected clock, so no test waits for it. The probe's own deadline
is ``max(timeouts.first_token, timeouts.health_timeout)``: 10 s with the shipped defaults, so these
tests set both to 1 s to keep a hung probe short; everything else is as shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.api.context import PROXY
from proxy.balancer.monitor import FAILS_TO_DOWN, Monitor
from proxy.balancer.outlier import Outliers
from proxy.balancer.state import InstanceState, LoadedModel, ModelBook
from proxy.commands.status import render
from proxy.config import EjectionConfig, GpuSpec, TimeoutConfig
from proxy.emulator.catalogue import Catalogue
from proxy.emulator.clock import RealClock
from proxy.emulator.engine import Engine
from proxy.emulator.events import ServerSettings
from proxy.emulator.store import ModelStore
from tests.integration.farm import emulator_server, farm

MODEL = "llama3.2:1b"
EMBED = "nomic-embed-text:latest"
TIMEOUTS = TimeoutConfig(first_token=1.0, health_timeout=1.0)
EJECTION = EjectionConfig()


class Clock:
    """The ejection clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Box:
    monitor: Monitor
    outliers: Outliers
    clock: Clock
    instances: list[InstanceState]
    servers: list[TestServer]
    downs: list[str] = field(default_factory=list)
    seen_loaded: list[tuple[str, frozenset[str]]] = field(default_factory=list)

    def url(self, i: int) -> str:
        return str(self.servers[i].make_url("")).rstrip("/")

    async def post(self, i: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.post(self.url(i) + path, json=body) as r:
            return r.status, json.loads(await r.read() or b"null")

    async def get(self, i: int, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.url(i) + path) as r:
            return await r.json()

    async def hang(self, i: int, on: bool) -> None:
        assert (await self.post(i, "/emulator/faults", {"hang": on}))[0] == 200

    def eject(self, inst: InstanceState) -> None:
        for _ in range(EJECTION.consecutive):
            self.outliers.failure(inst, "timeout")
        assert inst.ejected

    async def probe_round(self) -> None:
        """Let the back-off of every ejected instance run out, check, and wait for the probes."""
        self.clock.now = max([self.clock.now, *(i.ejected_until for i in self.instances)])
        await self.monitor.check_all()
        await self.monitor.wait_probes()


@contextlib.asynccontextmanager
async def box(tmp_path: Path, n: int = 2) -> AsyncIterator[Box]:
    """``n`` emulators (time 50x faster) and a Monitor over them with an injected ejection clock."""
    catalogue = Catalogue()
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for i in range(n):
            settings = ServerSettings(gpus=(GpuSpec(name=f"emu{i}", memory_gib=24),))
            engine = Engine(settings, RealClock(50.0))
            store = ModelStore(tmp_path / "models", catalogue)
            server = await emulator_server(stack, engine, store, catalogue)
            servers.append(server)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        instances = [
            InstanceState(name=f"gpu{i}", url=str(s.make_url("")).rstrip("/"), slots=4)
            for i, s in enumerate(servers)
        ]
        clock = Clock()
        outliers = Outliers(EJECTION, clock=clock)
        downs: list[str] = []
        seen: list[tuple[str, frozenset[str]]] = []

        def saw(inst: InstanceState, loaded: dict[str, LoadedModel], asked_at: float) -> None:
            seen.append((inst.name, frozenset(loaded)))
            inst.loaded = loaded  # what the router does with a poll nothing started after

        monitor = Monitor(
            instances,
            ModelBook(),
            session,
            TIMEOUTS,
            {},
            outliers=outliers,
            on_down=lambda inst: downs.append(inst.name),
            on_loaded=saw,
        )
        stack.push_async_callback(monitor.close)
        await monitor.check_all()
        assert all(i.healthy for i in instances)
        yield Box(monitor, outliers, clock, instances, servers, downs, seen)


async def test_a_hung_instance_fails_its_probe_and_stays_ejected_until_it_answers(
    tmp_path: Path,
) -> None:
    async with box(tmp_path) as b:
        gpu0 = b.instances[0]
        # a client pinned the model with its own context: the probe must neither reload nor unpin it
        load = {"model": MODEL, "prompt": "", "keep_alive": -1, "options": {"num_ctx": 8192}}
        assert (await b.post(0, "/api/generate", load))[0] == 200
        await b.monitor.check_all()
        assert list(gpu0.loaded) == [MODEL] and gpu0.loaded[MODEL].context_length == 8192
        b.eject(gpu0)
        await b.hang(0, True)

        await b.probe_round()
        assert gpu0.healthy, "GET / still answers: a health check alone would re-admit it"
        assert gpu0.ejected and not gpu0.routable and gpu0.ejections == 2
        assert gpu0.ejected_until == b.clock.now + 2 * EJECTION.base
        assert not b.instances[1].ejected and b.instances[1].routable

        await b.hang(0, False)
        await b.monitor.check_all()  # the back-off is not over: no probe yet
        await b.monitor.wait_probes()
        assert gpu0.ejected

        await b.probe_round()
        assert not gpu0.ejected and gpu0.routable and gpu0.ejections == 2
        [entry] = (await b.get(0, "/api/ps"))["models"]
        assert entry["context_length"] == 8192 and entry["expires_at"] > "2200"
        assert b.downs == []


async def test_a_probe_never_holds_up_the_other_checks(tmp_path: Path) -> None:
    async with box(tmp_path) as b:
        gpu0, gpu1 = b.instances
        assert (await b.post(0, "/api/generate", {"model": MODEL, "prompt": ""}))[0] == 200
        await b.monitor.check_all()
        b.eject(gpu0)
        await b.hang(0, True)
        b.clock.now = gpu0.ejected_until
        await b.monitor.check_all()
        assert gpu0.ejected and gpu0.ejections == 1, "the round ended with its probe in flight"
        gpu1.healthy = False  # the next round still checks the others while that probe hangs
        await b.monitor.check_all()
        assert gpu1.healthy and gpu0.ejections == 1
        await b.monitor.wait_probes()
        assert gpu0.ejected and gpu0.ejections == 2
        await b.hang(0, False)


async def test_an_ejected_instance_with_nothing_loaded_is_readmitted_on_get(
    tmp_path: Path,
) -> None:
    async with box(tmp_path, n=1) as b:
        [gpu0] = b.instances
        b.eject(gpu0)
        await b.hang(0, True)  # model requests would hang; GET / is all there is to probe
        await b.probe_round()
        assert not gpu0.ejected and gpu0.routable and gpu0.loaded == {}
        await b.hang(0, False)


async def test_an_embedding_model_is_probed_with_an_embedding(tmp_path: Path) -> None:
    async with box(tmp_path, n=1) as b:
        [gpu0] = b.instances
        status, _ = await b.post(0, "/api/embed", {"model": EMBED, "input": "x"})
        assert status == 200
        await b.monitor.check_all()
        assert list(gpu0.loaded) == [EMBED]
        b.eject(gpu0)
        await b.hang(0, True)
        await b.probe_round()
        assert gpu0.ejected
        await b.hang(0, False)
        await b.probe_round()
        assert not gpu0.ejected
        assert [m["name"] for m in (await b.get(0, "/api/ps"))["models"]] == [EMBED]


async def test_on_down_fires_once_for_a_server_that_stops_answering(tmp_path: Path) -> None:
    """A frozen process (SIGSTOP) accepts connections and never answers."""
    frozen: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frozen.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with box(tmp_path) as b:
            gpu0 = b.instances[0]
            gpu0.url = f"http://127.0.0.1:{port}"
            for _ in range(FAILS_TO_DOWN + 1):  # one more round: it fires once
                await b.monitor.check_all()
            assert not gpu0.healthy and not gpu0.routable and gpu0.state == "down"
            assert b.downs == ["gpu0"] and b.instances[1].healthy
    finally:
        for writer in frozen:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_failed_connect_marks_a_gone_process_down_and_its_return_does_not_eject(
    tmp_path: Path,
) -> None:
    async with box(tmp_path) as b:
        gpu0, gpu1 = b.instances
        b.outliers.failure(gpu1, "connect")  # one broken connection; the process answers
        await b.monitor.wait_probes()
        assert gpu1.healthy and gpu1.strikes == 1 and b.downs == []

        real = gpu0.url
        with socket.socket() as gone:
            gone.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
            gpu0.url = f"http://127.0.0.1:{gone.getsockname()[1]}"
            b.outliers.failure(gpu0, "connect")
            await b.monitor.wait_probes()  # checked at once, not at the next round
            assert not gpu0.healthy and b.downs == ["gpu0"]
            for _ in range(EJECTION.consecutive):  # requests that were racing towards it
                b.outliers.failure(gpu0, "connect")
            await b.monitor.wait_probes()
            assert b.downs == ["gpu0"] and not gpu0.ejected
        gpu0.url = real  # it was restarted
        await b.monitor.check_all()
        assert gpu0.healthy and gpu0.routable and not gpu0.ejected and gpu0.strikes == 0


async def test_the_monitor_reports_loaded_models_and_leaves_reservations_alone(
    tmp_path: Path,
) -> None:
    async with box(tmp_path, n=1) as b:
        [gpu0] = b.instances
        gpu0.loading[MODEL] = 123
        assert (await b.post(0, "/api/generate", {"model": MODEL, "prompt": ""}))[0] == 200
        b.seen_loaded.clear()
        await b.monitor.check_all()
        assert b.seen_loaded == [("gpu0", frozenset({MODEL}))]
        assert list(gpu0.loaded) == [MODEL] and gpu0.loading == {MODEL: 123}


async def test_a_probe_answered_with_a_server_error_fails(tmp_path: Path) -> None:
    async with box(tmp_path, n=1) as b:
        [gpu0] = b.instances
        assert (await b.post(0, "/api/generate", {"model": MODEL, "prompt": ""}))[0] == 200
        await b.monitor.check_all()
        b.eject(gpu0)
        assert (await b.post(0, "/emulator/faults", {"fail_next": 1}))[0] == 200
        await b.probe_round()
        assert gpu0.ejected and gpu0.ejections == 2
        await b.probe_round()
        assert not gpu0.ejected


async def test_stopping_the_monitor_cancels_its_probe_and_starts_no_more(tmp_path: Path) -> None:
    async with box(tmp_path, n=1) as b:
        [gpu0] = b.instances
        assert (await b.post(0, "/api/generate", {"model": MODEL, "prompt": ""}))[0] == 200
        await b.monitor.check_all()
        b.eject(gpu0)
        await b.hang(0, True)
        b.clock.now = gpu0.ejected_until
        await b.monitor.check_all()  # the probe hangs in its task
        running = asyncio.get_running_loop().create_task(b.monitor.run())
        await asyncio.sleep(0)
        running.cancel()  # as the app does on shutdown
        with contextlib.suppress(asyncio.CancelledError):
            await running
        assert gpu0.ejected and gpu0.ejections == 1, "a cancelled probe decides nothing"
        await b.hang(0, False)
        await b.monitor.check_all()
        await b.monitor.wait_probes()
        assert gpu0.ejected and gpu0.ejections == 1, "no probe after the monitor stopped"


async def test_status_and_metrics_show_an_ejected_instance(tmp_path: Path) -> None:
    async with farm(tmp_path) as f:
        proxy = f.proxy_server.app[PROXY]
        gpu1 = proxy.instances[1]
        for _ in range(EJECTION.consecutive):
            proxy.router.outliers.failure(gpu1, "midstream")
        before = time.time()
        async with aiohttp.ClientSession() as s, s.get(f.url + "/proxy/status") as r:
            data = await r.json()
        entry = {i["name"]: i for i in data["instances"]}["gpu1"]
        assert entry["state"] == "ejected" and entry["ejected"] and entry["healthy"]
        assert entry["ejections"] == 1 and entry["strikes"] == 0
        assert before < entry["ejected_until"]
        assert {i["name"]: i["ejected_until"] for i in data["instances"]}["gpu0"] is None

        row = next(line for line in render(data).splitlines() if line.startswith("gpu1"))
        assert "ejected (probe in " in row
        later = render(data, now=entry["ejected_until"] + 1)
        assert "ejected (probing)" in next(ln for ln in later.splitlines() if ln.startswith("gpu1"))

        assert f.sample("ollamux_instance_ejected", {"backend": "gpu1"}) == 1
        assert f.sample("ollamux_instance_up", {"backend": "gpu1"}) == 1
        assert f.sample("ollamux_ejections_total", {"backend": "gpu1"}) == 1
        assert f.sample("ollamux_ejections_total", {"backend": "gpu0"}) == 0
