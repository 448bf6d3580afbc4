"""The chaos benchmark's clients: one request and how it ended, closed loops, open loops, storms.

Every request is a :class:`Call` that records when it was sent, its status, its first body byte
and how its answer ended; :attr:`Call.kind` sorts it into one of :data:`KINDS`. A :class:`Load`
runs requests as tasks and, at the end, waits a bounded time for those still running: what is
left then is marked ``hung`` and cancelled, so no scenario waits for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

KINDS = ("ok", "refused", "lost", "cut", "silent", "cancelled")
"""ok: a complete answer (``done: true``); refused: 503, 413 or 429, or the proxy's port closed (a
deliberate no); lost: no byte of an answer (a connection error, any other status, or nothing by
the harness's deadline); cut: the answer ended early with an ``{"error": ...}`` line; silent: the
answer ended early without one (connection closed, or hung at the deadline); cancelled: the
client left on purpose before the answer ended."""
REFUSALS = frozenset({413, 429, 503})
_IDS = itertools.count(1)


class Clock:
    """Seconds since the scenario started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


@dataclass(kw_only=True)
class Call:
    """One request and what became of it; times are on the scenario's clock."""

    model: str
    stream: bool = True
    num_predict: int = 200
    endpoint: str = "/api/chat"
    sent: float = 0.0
    status: int | None = None
    first: float | None = None
    """First byte of the body of a 200 answer."""
    end: float | None = None
    done: bool = False
    error_line: bool = False
    refused_connection: bool = False
    hung: bool = False
    """Still running when the harness stopped waiting."""
    cancelled: bool = False
    """The client left on purpose (the cancel storm)."""
    detail: str = ""
    payload: bytes | None = field(default=None, repr=False)
    """The body to send instead of a generated one."""

    @property
    def kind(self) -> str:
        if self.done:
            return "ok"
        if self.cancelled:
            return "cancelled"
        if self.refused_connection or self.status in REFUSALS:
            return "refused"
        if self.status != 200 or self.first is None:
            return "lost"
        return "cut" if self.error_line else "silent"

    @property
    def ttfb(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    def body(self) -> bytes:
        if self.payload is not None:
            return self.payload
        n = next(_IDS)
        doc: dict[str, Any] = {"model": self.model, "stream": self.stream,
                               "options": {"num_predict": self.num_predict}}  # fmt: skip
        if self.endpoint == "/api/chat":
            doc["messages"] = [{"role": "user", "content": f"chaos {n}: tell me a long story"}]
        else:
            doc["prompt"] = f"chaos {n}: tell me a long story"
        return json.dumps(doc).encode()

    def row(self) -> dict[str, Any]:
        """The call for the JSON document (times rounded to ms)."""
        out = {"kind": self.kind, "model": self.model, "stream": self.stream,
               "endpoint": self.endpoint, "status": self.status, "sent": _ms(self.sent),
               "first": _ms(self.first), "end": _ms(self.end), "hung": self.hung}  # fmt: skip
        if self.detail:
            out["detail"] = self.detail[:200]
        return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _look(call: Call, line: bytes) -> None:
    """Read the answer's last line: ``done`` or an error line."""
    try:
        doc = json.loads(line)
    except ValueError:
        return
    if isinstance(doc, dict):
        call.done = doc.get("done") is True
        call.error_line = "error" in doc
        if call.error_line:
            call.detail = str(doc["error"])


async def request(session: aiohttp.ClientSession, url: str, call: Call, clock: Clock) -> Call:
    """Send ``call`` and read its answer to the end; cancellation leaves ``call`` as it was then."""
    call.sent = clock()
    last = b""
    tail = b""
    try:
        async with session.post(url + call.endpoint, data=call.body(),
                                headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            call.status = resp.status
            async for chunk in resp.content.iter_any():
                if call.first is None and chunk:
                    call.first = clock()
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                for line in reversed(lines):
                    if line.strip():
                        last = line
                        break
            if tail.strip():
                last = tail
            if resp.status != 200:
                call.detail = last.decode("utf-8", "replace")
            elif last:
                _look(call, last)
    except aiohttp.ClientConnectorError as exc:
        call.refused_connection = True
        call.detail = f"connect: {exc.os_error}"
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        call.detail = f"{type(exc).__name__}: {exc}"
        if last:
            _look(call, last)
    finally:
        call.end = clock()
    return call


@dataclass
class Load:
    """Requests in flight as tasks, bounded at the end by :meth:`finish`."""

    session: aiohttp.ClientSession
    url: str
    clock: Clock
    rng: random.Random
    calls: list[Call] = field(default_factory=list)
    stopping: bool = False
    _live: dict[asyncio.Task[Call], Call] = field(default_factory=dict)
    _loops: list[asyncio.Task[None]] = field(default_factory=list)
    _arrivals: list[asyncio.Task[None]] = field(default_factory=list)

    def send(self, call: Call) -> asyncio.Task[Call]:
        """Start ``call`` now; it is kept in :attr:`calls`."""
        self.calls.append(call)
        task = asyncio.ensure_future(request(self.session, self.url, call, self.clock))
        self._live[task] = call
        task.add_done_callback(lambda t: self._live.pop(t, None))
        return task

    def closed(self, clients: int, make: Callable[[], Call]) -> None:
        """``clients`` users, each sending its next request when the last one ended."""

        async def user() -> None:
            while not self.stopping:
                await self.send(make())

        self._loops += [asyncio.ensure_future(user()) for _ in range(clients)]

    def open(self, rate: float, seconds: float, make: Callable[[], Call]) -> None:
        """Poisson arrivals at ``rate`` per second for ``seconds``, whatever the answers do."""

        async def arrivals() -> None:
            end = self.clock() + seconds
            due = self.clock()
            while not self.stopping:
                due += self.rng.expovariate(rate)
                if due >= end:
                    return
                await asyncio.sleep(max(0.0, due - self.clock()))
                self.send(make())

        self._arrivals.append(asyncio.ensure_future(arrivals()))

    async def storm(
        self, n: int, concurrency: int, make: Callable[[], Call], cancel_s: tuple[float, float]
    ) -> None:
        """``n`` requests, ``concurrency`` at a time, each cancelled by its client after a delay
        drawn from ``cancel_s`` unless its answer ended first."""
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                call = make()
                task = self.send(call)
                done, _ = await asyncio.wait({task}, timeout=self.rng.uniform(*cancel_s))
                if not done:
                    call.cancelled = True
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        await asyncio.gather(*(one() for _ in range(n)))

    async def abort(self) -> None:
        """Cancel everything at once (the scenario failed or was interrupted)."""
        self.stopping = True
        tasks = [*self._arrivals, *self._loops, *self._live]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def finish(self, until: float) -> None:
        """No new requests; wait for those in flight until ``until`` on the clock, then mark what
        is left ``hung`` and cancel it."""
        self.stopping = True
        for arrivals in self._arrivals:
            arrivals.cancel()
        while self._live and self.clock() < until:
            await asyncio.wait(set(self._live), timeout=max(0.0, until - self.clock()))
        for task, call in list(self._live.items()):
            call.hung = True
            task.cancel()
        await asyncio.gather(*self._live, *self._arrivals, return_exceptions=True)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        self._arrivals.clear()


class Client:
    """An HTTP session with no connection limit and no overall timeout (the harness bounds each
    request), and the loads that use it: leaving it cancels whatever they still run."""

    def __init__(self) -> None:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0),
        )
        self._loads: list[Load] = []

    def load(self, url: str, clock: Clock, rng: random.Random) -> Load:
        load = Load(self.http, url, clock, rng)
        self._loads.append(load)
        return load

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for load in self._loads:
            await load.abort()
        await self.http.close()
