"""The overhead benchmark's load: N token streams in closed loops and one first-byte probe.

The client is a raw asyncio protocol (HTTP/1.1 keep-alive, one connection per stream) rather
than aiohttp, so that it costs little CPU per chunk: it shares a core with the backend, and at
hundreds of streams an aiohttp client would be what limits the chunks per second, not the front.
A stream sends a small ``/api/chat`` and reads its chunked NDJSON answer to the end, again and
again; chunks are counted as NDJSON lines. The probe sends one-token requests one after another
and times the first byte of each answer's body.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from benchmarks.procs import cpu_seconds

_END = b"\r\n0\r\n\r\n"
PROBE_GAP = 0.002
"""Pause between two probes (seconds), so the probe is a user, not a hot loop."""


@dataclass
class Level:
    """One path at one concurrency: what the client measured and what the front spent."""

    ttft: list[float] = field(default_factory=list)
    chunks: int = 0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    front_cpu_s: float | None = None


class _Http(asyncio.Protocol):
    """One keep-alive connection; ``ask`` sends a request and resolves with (status, first byte
    time) once the whole answer came; body lines go to ``level.chunks`` while ``counting``."""

    def __init__(self, level: Level, counting: dict[str, bool]) -> None:
        self.level = level
        self.counting = counting
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[tuple[int, float | None]] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._head = b""
        self._in_body = False
        self._status = 0
        self._left = -1  # Content-Length still to come; -1: chunked
        self._tail = b""
        self._first: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def ask(self, request: bytes) -> asyncio.Future[tuple[int, float | None]]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self._head, self._in_body, self._tail, self._first = b"", False, b"", None
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._head[:end].decode("latin-1").lower()
            self._status = int(head.split(" ", 2)[1])
            self._left = -1
            for line in head.split("\r\n")[1:]:
                if line.startswith("content-length:"):
                    self._left = int(line.split(":", 1)[1])
            self._in_body = True
            data = self._head[end + 4 :]
        if data and self._first is None:
            self._first = time.perf_counter()
        if self.counting["chunks"]:
            self.level.chunks += (self._tail[-1:] + data).count(b"}\n")
        if self._left >= 0:
            self._left -= len(data)
            finished = self._left <= 0
        else:
            self._tail = (self._tail + data)[-len(_END) :]
            finished = self._tail == _END
        if finished and self.done is not None and not self.done.done():
            self._in_body = False
            self.done.set_result((self._status, self._first))


def _request(host: str, port: int, body: bytes) -> bytes:
    return (
        f"POST /api/chat HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _loop(
    host: str, port: int, body: bytes, level: Level, counting: dict[str, bool], probe: bool
) -> None:
    loop = asyncio.get_running_loop()
    request = _request(host, port, body)
    while True:
        try:
            _, conn = await loop.create_connection(lambda: _Http(level, counting), host, port)
        except OSError:
            level.errors += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while conn.transport is not None:
                t0 = time.perf_counter()
                try:
                    status, first = await conn.ask(request)
                except ConnectionError:
                    level.errors += 1
                    break
                ok = status == 200
                level.requests += not probe
                level.errors += not ok
                if probe:
                    if counting["probe"] and ok and first is not None:
                        level.ttft.append(first - t0)
                    await asyncio.sleep(PROBE_GAP)
        finally:
            if conn.transport is not None:
                conn.transport.close()


async def measure(
    host: str,
    port: int,
    streams: int,
    pids: list[int],
    *,
    body: bytes,
    probe_body: bytes | None,
    warmup: float,
    seconds: float,
) -> Level:
    """``streams`` streams in closed loops: chunks and the front's CPU are counted over ``seconds``
    after ``warmup``; then, with the streams still flowing, the probe (if ``probe_body``) sends
    one-token requests one after another for another ``seconds`` and times their first byte."""
    level = Level()
    counting = {"chunks": False, "probe": False}
    workers = [
        asyncio.create_task(_loop(host, port, body, level, counting, False)) for _ in range(streams)
    ]
    try:
        await asyncio.sleep(warmup)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        counting["chunks"] = True
        await asyncio.sleep(seconds)
        counting["chunks"] = False
        level.seconds = time.perf_counter() - t0
        if pids:
            level.front_cpu_s = sum(cpu_seconds(p) for p in pids) - cpu0
        if probe_body is not None:
            workers.append(
                asyncio.create_task(_loop(host, port, probe_body, level, counting, True))
            )
            await asyncio.sleep(0.2)
            counting["probe"] = True
            await asyncio.sleep(seconds)
    finally:
        for w in workers:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*workers, return_exceptions=True)
    return level
