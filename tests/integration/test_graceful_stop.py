"""`ollamux serve` as a real process: SIGTERM drains streams in flight, a second signal cuts them,
``timeouts.drain`` bounds the drain, an external instance down at start is picked up later; and
the proxy's server cancelled while draining."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.api.context import PROXY
from proxy.api.stopping import GATE
from proxy.app import build_app, serve_proxy
from proxy.config import ModelSpec, config_from_dict
from tests.conftest import MakeEmulator
from tests.processes import Spawn, alive, children_of, free_ports

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

SLOW = (
    "{name: 'slow:1b', size_gb: 0.5, parameters: 1.0B, decode_tps: 40, prompt_tps: 20000, "
    "load_gbps: 50, kv_kib_per_token: 16}"
)
"""A model that answers at 40 tokens/s in real time, so streams are still running at SIGTERM."""


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def write_box(tmp_path: Path, *, drain: str = "", external: int = 0) -> tuple[Path, int]:
    """Two emulated instances (4 + 2 slots) serving ``slow:1b`` in real time, and optionally an
    external instance ``remote`` on port ``external``; returns the config and the proxy's port."""
    listen, a, b = free_ports(3)
    timeouts = f"timeouts: {{drain: {drain}}}\n" if drain else ""
    remote = f"  - {{name: remote, launcher: external, url: 'http://127.0.0.1:{external}'}}\n"
    path = tmp_path / "box.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        f"models_dir: {tmp_path / 'models'}\n"
        f"emulator:\n  models: [{SLOW}]\n"
        "  gpus: [{name: g0, memory_gib: 24}, {name: g1, memory_gib: 24}]\n"
        "instances:\n"
        f"  - {{name: gpu0, launcher: emulated, gpu: g0, port: {a}, num_parallel: 4}}\n"
        f"  - {{name: gpu1, launcher: emulated, gpu: g1, port: {b}, num_parallel: 2}}\n"
        + (remote if external else "")
        + timeouts
    )
    return path, listen


async def logged(log: Path, text: str, proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The log once it holds ``text``; fails if the process exits first or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in (output := log.read_text()):
        assert proc.poll() is None, f"exited with {proc.returncode} before {text!r}:\n{output}"
        assert loop.time() < deadline, f"never logged {text!r}:\n{output}"
        await asyncio.sleep(0.05)
    return output


async def exit_code(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


class Stream:
    """One streamed /api/generate through the proxy: its lines, and how it ended."""

    def __init__(
        self, client: aiohttp.ClientSession, url: str, tokens: int, *, model: str = "slow:1b"
    ) -> None:
        self.first = asyncio.Event()
        self.lines: list[dict[str, Any]] = []
        self.error = ""
        body = {"model": model, "prompt": "hi", "options": {"num_predict": tokens}}
        self.task = asyncio.ensure_future(self._run(client, url + "/api/generate", body))

    async def _run(self, client: aiohttp.ClientSession, url: str, body: object) -> None:
        try:
            async with client.post(url, json=body) as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    self.lines.append(json.loads(line))
                    self.first.set()
        except aiohttp.ClientError as exc:
            self.error = type(exc).__name__
        finally:
            self.first.set()

    @property
    def done(self) -> bool:
        return bool(self.lines) and self.lines[-1].get("done") is True and not self.error


async def streams_in_flight(
    client: aiohttp.ClientSession, url: str, tokens: list[int]
) -> list[Stream]:
    """Streams of ``tokens`` tokens each, returned once every one has its first line."""
    streams = [Stream(client, url, n) for n in tokens]
    await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams)), 30)
    assert all(s.lines and not s.error for s in streams), [s.error for s in streams]
    return streams


async def whole(client: aiohttp.ClientSession, url: str, tokens: int) -> tuple[int, int]:
    """A non-streamed /api/generate of ``slow:1b``: its status and eval_count."""
    body = {"model": "slow:1b", "prompt": "hi", "stream": False, "options": {"num_predict": tokens}}
    async with client.post(url + "/api/generate", json=body) as response:
        return response.status, (await response.json())["eval_count"]


def keep_alive(port: int) -> http.client.HTTPConnection:
    """A connection that has had one answer and stays open (HTTP/1.1 keep-alive)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/version")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Connection") != "close"
    response.read()
    return conn


def post(conn: http.client.HTTPConnection, path: str, body: object) -> http.client.HTTPResponse:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# --- SIGTERM drains ------------------------------------------------------------------------------


async def test_sigterm_refuses_new_requests_lets_every_stream_finish_then_stops_the_instances(
    spawn: Spawn, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config, port = write_box(tmp_path)
    proc, log = spawn("serve", "--config", str(config))
    await logged(log, "instance(s) up", proc)
    await logged(log, "proxy listening", proc)
    instances = children_of(proc.pid)
    assert len(instances) == 2
    url = f"http://127.0.0.1:{port}"
    native, openai = keep_alive(port), keep_alive(port)
    unstreamed = asyncio.ensure_future(whole(client, url, 80))
    streams = await streams_in_flight(client, url, [80] * 5)

    proc.send_signal(signal.SIGTERM)
    await logged(log, "stopping: new requests are refused", proc)
    assert "waiting for 6 request(s) in flight" in log.read_text()
    assert refused(port)  # the listening socket is closed
    # a request on a connection opened before: 503, told when to retry, and the connection closes
    answer = await asyncio.to_thread(post, native, "/api/chat", {"model": "slow:1b"})
    assert answer.status == 503
    assert answer.getheader("Retry-After") == "5" and answer.getheader("Connection") == "close"
    assert json.loads(answer.read()) == {
        "error": "the proxy is stopping and takes no new requests; retry shortly"
    }
    answer = await asyncio.to_thread(post, openai, "/v1/chat/completions", {"model": "slow:1b"})
    assert answer.status == 503 and answer.getheader("Retry-After") == "5"
    error = json.loads(answer.read())["error"]
    assert error["type"] == "api_error" and error["message"].startswith("the proxy is stopping")

    await asyncio.gather(*(s.task for s in streams))
    assert [s.error for s in streams] == [""] * 5
    assert all(s.done for s in streams)
    assert [s.lines[-1]["eval_count"] for s in streams] == [80] * 5
    assert await unstreamed == (200, 80)  # a non-streamed answer in flight finishes too
    assert await exit_code(proc) == 0
    output = log.read_text()
    assert "drained: every request in flight finished; refused 2 new request(s)" in output
    drained = output.index("drained: every request")
    assert drained < output.index("stopped gpu0 (pid") and drained < output.index("stopped gpu1")
    assert not any(alive(pid) for pid in instances)
    assert "Traceback" not in output


async def test_a_second_signal_cuts_the_drain_and_stops_at_once(
    spawn: Spawn, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config, port = write_box(tmp_path)
    proc, log = spawn("serve", "--config", str(config))
    await logged(log, "proxy listening", proc)
    instances = children_of(proc.pid)
    streams = await streams_in_flight(client, f"http://127.0.0.1:{port}", [4000] * 3)

    proc.send_signal(signal.SIGTERM)
    await logged(log, "stopping: new requests are refused", proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C counts as the second signal too
    assert await exit_code(proc, timeout=20) == 0
    await asyncio.gather(*(s.task for s in streams))
    assert not any(s.done for s in streams)
    assert all(s.error for s in streams)  # cut: the client sees an incomplete answer
    output = log.read_text()
    assert "stopping at once (second signal): cutting 3 request(s)" in output
    assert output.index("cutting 3") < output.index("stopped gpu0 (pid")
    assert "all instances stopped" in output
    assert not any(alive(pid) for pid in instances)
    assert "Traceback" not in output


async def test_timeouts_drain_bounds_the_wait_and_cuts_what_is_left(
    spawn: Spawn, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config, port = write_box(tmp_path, drain="2s")
    proc, log = spawn("serve", "--config", str(config))
    await logged(log, "proxy listening", proc)
    short, *long = await streams_in_flight(client, f"http://127.0.0.1:{port}", [20, 4000, 4000])

    proc.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0
    await asyncio.gather(short.task, *(s.task for s in long))
    assert short.done and short.lines[-1]["eval_count"] == 20
    assert not any(s.done for s in long) and all(s.error for s in long)
    output = log.read_text()
    assert "waiting for 3 request(s) in flight (up to timeouts.drain = 2 s" in output
    assert "drain deadline (2 s) passed: cutting 2 request(s) still in flight" in output
    assert output.count('error="cut: the proxy stopped"') == 2, output
    assert "Traceback" not in output


# --- an external instance down at start ----------------------------------------------------------


async def test_an_external_instance_down_at_start_is_marked_down_and_picked_up_when_it_answers(
    spawn: Spawn, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (remote,) = free_ports(1)
    config, port = write_box(tmp_path, external=remote)
    proc, log = spawn("serve", "--config", str(config))
    output = await logged(log, "proxy listening", proc)
    assert "2 of 3 instance(s) up; starting the routing proxy" in output
    assert f"remote (external) does not answer http://127.0.0.1:{remote}/" in output
    url = f"http://127.0.0.1:{port}"
    body = {"model": "slow:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}

    async def instances() -> dict[str, str]:
        async with client.get(url + "/proxy/instances") as response:
            return {i["name"]: i["state"] for i in (await response.json())["instances"]}

    assert await instances() == {"gpu0": "up", "gpu1": "up", "remote": "down"}
    async with client.post(url + "/api/generate", json=body) as response:  # the others serve
        assert response.status == 200 and (await response.json())["eval_count"] == 2

    backend, _ = spawn(
        "emulate", "--listen", f"127.0.0.1:{remote}", "--gpu", "r:24", "--speed", "20",
        "--models-dir", str(tmp_path / "remote-models"),
    )  # fmt: skip
    for _ in range(600):  # the monitor probes it every timeouts.health_interval
        assert proc.poll() is None and backend.poll() is None, log.read_text()
        if (await instances())["remote"] == "up":
            break
        await asyncio.sleep(0.05)
    assert await instances() == {"gpu0": "up", "gpu1": "up", "remote": "up"}
    for name in ("gpu0", "gpu1"):  # only remote is left to route to
        async with client.post(f"{url}/proxy/instances/{name}/drain") as response:
            assert response.status == 200, await response.text()
    body["model"] = "llama3.2:1b"  # in the remote emulator's own catalogue
    async with client.post(url + "/api/generate", json=body) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["eval_count"] == 2
    assert "instance remote (http://127.0.0.1:" in log.read_text()  # the monitor's "is up" line
    proc.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0
    assert "Traceback" not in log.read_text()


async def test_sigterm_while_waiting_for_a_first_answer_stops_at_once(
    spawn: Spawn, tmp_path: Path
) -> None:
    port, listen = free_ports(2)
    path = tmp_path / "ext.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        f"instances: [{{name: remote, launcher: external, url: 'http://127.0.0.1:{port}'}}]\n"
    )
    proc, log = spawn("serve", "--config", str(path))
    await logged(log, "no instance answers yet; waiting up to 60 s (timeouts.start)", proc)
    proc.send_signal(signal.SIGTERM)
    assert await exit_code(proc, timeout=15) == 0
    output = log.read_text()
    assert "proxy listening" not in output and "all instances stopped" in output
    assert "Traceback" not in output


# --- in process: cancelling the server -----------------------------------------------------------

CRAWL = ModelSpec(name="crawl:1b", size_gb=0.5, parameters="1.0B", decode_tps=0.2,
                  prompt_tps=20000, load_gbps=10, kv_kib_per_token=16)  # fmt: skip
"""About 40 tokens per real second at the test emulator's time compression (200x)."""


async def test_cancelling_the_server_during_the_drain_cuts_at_once_and_cleans_up(
    make_emulator: MakeEmulator, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    emulator = await make_emulator(models=(CRAWL,), root=tmp_path / "models")
    (port,) = free_ports(1)
    raw = {
        "listen": f"127.0.0.1:{port}",
        "instances": [{"name": "e", "launcher": "external", "url": emulator.url}],
    }
    config = config_from_dict(raw, source="test")
    app = build_app(config)
    stop, cut = asyncio.Event(), asyncio.Event()
    server = asyncio.ensure_future(
        serve_proxy(app, config.listen, stop=stop, cut=cut, drain=config.timeouts.drain)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with client.get(url + "/api/version") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
        stream = Stream(client, url, 4000, model=CRAWL.name)
        await asyncio.wait_for(stream.first.wait(), 30)
        stop.set()
        while not app[GATE].closed:
            await asyncio.sleep(0.01)
        assert app[GATE].in_flight == 1
        assert not app[PROXY].client().closed  # the app (its monitor included) lives on meanwhile
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    await asyncio.wait_for(stream.task, 10)
    assert stream.error and not stream.done
    assert app[GATE].in_flight == 0
    assert app[PROXY].client().closed  # the app's cleanup ran
