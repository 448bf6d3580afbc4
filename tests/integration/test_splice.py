"""The spliced relay (proxy/splice.py) at each of its failure points, through real sockets.

The instance is a scripted Ollama on a raw socket, so a test decides where its bytes are cut: a
token split across two writes or inside its size line, a break in the middle of a chunk, a
silence past the idle deadline, an answer bigger than any buffer for a client that reads nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.api.clients import runner_options
from proxy.app import build_app
from proxy.config import config_from_dict
from proxy.forward import BROKEN

MODEL = "llama3.2:1b"
_ENTRY = {"name": MODEL, "model": MODEL, "size": 1_300_000_000, "digest": "0" * 64}
_PS = _ENTRY | {
    "size_vram": 1_300_000_000,
    "context_length": 4096,
    "expires_at": "2300-01-01T00:00:00Z",
}
_STATIC = {
    "/": (b"Ollama is running", "text/plain"),
    "/api/version": (b'{"version":"0.32.15"}', "application/json"),
    "/api/tags": (json.dumps({"models": [_ENTRY]}).encode(), "application/json"),
    "/api/ps": (json.dumps({"models": [_PS]}).encode(), "application/json"),
}
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)
Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def token(text: str) -> bytes:
    line = {"model": MODEL, "message": {"role": "assistant", "content": text}, "done": False}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


FINAL = (
    json.dumps(
        {"model": MODEL, "done": True, "prompt_eval_count": 7, "eval_count": 3},
        separators=(",", ":"),
    ).encode()
    + b"\n"
)


@dataclass
class Upstream:
    """A scripted instance: health checks answered, each /api/chat played by ``script``."""

    script: Script | None = None
    chats: int = 0
    connections_for_chats: set[int] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a chat's connection was closed by the proxy."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                route = path.decode().split("?")[0]
                if method == b"POST" and route == "/api/chat" and self.script is not None:
                    self.chats += 1
                    self.connections_for_chats.add(id(writer))
                    await self.script(writer)
                    await writer.drain()
                    if writer.is_closing():
                        return
                    continue
                body, kind = _STATIC.get(route, (b"404 page not found", "text/plain"))
                status = "200 OK" if route in _STATIC else "404 Not Found"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
        if self.chats:
            self.closed.set()


@dataclass
class Box:
    url: str
    upstream: Upstream
    registry: CollectorRegistry

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def box(tmp_path: Path, timeouts: dict[str, Any] | None = None) -> AsyncIterator[Box]:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    raw = {
        "listen": "127.0.0.1:1",
        "instances": [{"name": "gpu0", "launcher": "external", "url": f"http://127.0.0.1:{port}"}],
        "timeouts": {"health_interval": 0.2, "connect": 1.0, **(timeouts or {})},
    }
    config = config_from_dict(raw, source="test")
    registry = CollectorRegistry()
    proxy = TestServer(build_app(config, registry=registry), host="127.0.0.1")
    await proxy.start_server(**runner_options(config.limits))
    try:
        yield Box(str(proxy.make_url("")).rstrip("/"), upstream, registry)
    finally:
        await proxy.close()
        server.close()
        for task in upstream.tasks:
            task.cancel()
        await asyncio.gather(*upstream.tasks, return_exceptions=True)
        await server.wait_closed()


async def chat(url: str) -> tuple[int, bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(url + "/api/chat", json=body) as r:
        return r.status, await asyncio.wait_for(r.read(), 30)


async def inflight(b: Box) -> float:
    async with aiohttp.ClientSession() as s, s.get(b.url + "/proxy/status") as r:
        data = await r.json()
    return float(sum(i["inflight_total"] for i in data["instances"]))


async def settle(b: Box) -> None:
    for _ in range(200):
        if await inflight(b) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("a slot is still held")


async def test_an_answer_cut_anywhere_arrives_whole_and_the_connection_is_reused(
    tmp_path: Path,
) -> None:
    async def script(w: asyncio.StreamWriter) -> None:
        one, two, three = chunk(token("a")), chunk(token("b")), chunk(token("c"))
        for piece in (
            HEAD + one,
            two[:9],
            two[9:] + three[:1],
            three[1:],
            chunk(FINAL),
            b"0\r\n\r\n",
        ):
            w.write(piece)
            await w.drain()
            await asyncio.sleep(0.02)

    async with box(tmp_path) as b:
        b.upstream.script = script
        for _ in range(2):
            status, raw = await chat(b.url)
            assert status == 200
            assert raw == token("a") + token("b") + token("c") + FINAL
        assert b.upstream.chats == 2 and len(b.upstream.connections_for_chats) == 1
        labels = {"backend": "gpu0", "model": MODEL, "kind": "eval"}
        assert b.sample("ollamux_tokens_total", labels) == 6
        await settle(b)


async def test_an_instance_that_breaks_mid_chunk_ends_the_answer_with_ollamas_error(
    tmp_path: Path,
) -> None:
    async def script(w: asyncio.StreamWriter) -> None:
        w.write(HEAD + chunk(token("a")))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(chunk(token("half"))[:20])
        await w.drain()
        await asyncio.sleep(0.05)
        w.close()

    async with box(tmp_path) as b:
        b.upstream.script = script
        status, raw = await chat(b.url)
        lines = raw.splitlines()
        assert status == 200 and lines[0] == token("a").strip()
        assert json.loads(lines[-1]) == {"error": BROKEN}
        labels = {"backend": "gpu0", "kind": "midstream"}
        assert b.sample("ollamux_upstream_errors_total", labels) == 1
        await settle(b)


async def test_a_silence_past_the_idle_deadline_cuts_the_answer(tmp_path: Path) -> None:
    """About timeouts.idle: short here; the shipped 30 s is the same mechanism."""

    async def script(w: asyncio.StreamWriter) -> None:
        w.write(HEAD + chunk(token("a")))
        await w.drain()
        await asyncio.sleep(3600)  # cancelled when the proxy closes the connection

    async with box(tmp_path, timeouts={"idle": 0.5}) as b:
        b.upstream.script = script
        status, raw = await chat(b.url)
        lines = raw.splitlines()
        assert status == 200 and lines[0] == token("a").strip()
        assert "stopped answering" in json.loads(lines[-1])["error"]
        await settle(b)


async def test_a_client_that_leaves_closes_the_instances_connection(tmp_path: Path) -> None:
    async def script(w: asyncio.StreamWriter) -> None:
        w.write(HEAD)
        while not w.is_closing():
            w.write(chunk(token("a")))
            await w.drain()
            await asyncio.sleep(0.01)

    async with box(tmp_path) as b:
        b.upstream.script = script
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s, s.post(b.url + "/api/chat", json=body) as r:
            assert await r.content.readline() == token("a")
        await asyncio.wait_for(b.upstream.closed.wait(), 10)
        await settle(b)


async def test_a_client_that_reads_nothing_stops_the_reading_upstream(tmp_path: Path) -> None:
    """Nothing is buffered without bound: the instance's writes block, then all arrives."""
    line = b'{"x":"' + b"y" * ((1 << 18) - 9) + b'"}\n'
    lines, sent = 256, [0]

    async def script(w: asyncio.StreamWriter) -> None:
        w.write(HEAD)
        for _ in range(lines):
            w.write(chunk(line))
            await w.drain()
            sent[0] += len(line)
        w.write(b"0\r\n\r\n")

    async with box(tmp_path) as b:
        b.upstream.script = script
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        host, port = b.url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        writer.write(
            f"POST /api/chat HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        for _ in range(200):
            if sent[0]:
                break
            await asyncio.sleep(0.05)
        seen = -1
        while seen != sent[0]:  # until the instance can write no more
            seen = sent[0]
            await asyncio.sleep(0.5)
        assert sent[0] < lines * len(line) // 2
        await reader.readuntil(b"\r\n\r\n")
        got = 0
        while got < lines * len(line):
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            assert size > 0
            got += len(await reader.readexactly(size + 2)) - 2
        assert got == lines * len(line)
        writer.close()
        await writer.wait_closed()
        await settle(b)
