"""Replays a scenario against a running contender and watches its backends while it runs.

The client sends each request at its arrival time (virtual seconds / speed of wall time), or
``think`` seconds after the request it follows ended, reads the NDJSON stream as it comes (time to
the first byte; the final line's metrics), and gives up on what is still running at the deadline.
A sampler polls every backend's ``/api/ps`` and ``/gpus`` once per emulated second: models that
appear are loads, models that vanish before their ``expires_at`` are evictions, and the GPUs'
utilization integrates to busy time.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.contenders import Running
from benchmarks.openai_wire import NATIVE, PATHS, openai_body, read_answer
from benchmarks.workload import Req, Scenario

JSON_HEADERS = {"Content-Type": "application/json"}
USER_HEADER = "X-OpenWebUI-User-Id"
"""Open WebUI's header naming the user a request is sent for."""
_TAIL = 1 << 16


@dataclass(kw_only=True)
class Result:
    """What happened to one request; times are virtual seconds since the run started."""

    req: Req
    sent: float | None = None
    first: float | None = None
    done: float | None = None
    status: int | None = None
    error: str = ""
    eval_count: int = 0
    prompt_eval_count: int = 0
    load_duration: float = 0.0
    backend: str = ""

    @property
    def ok(self) -> bool:
        return self.done is not None and not self.error

    @property
    def unfinished(self) -> bool:
        """Still running (or never sent) when the run's deadline came."""
        return self.done is None and not self.error


@dataclass(kw_only=True)
class Watch:
    """What the sampler saw on the backends."""

    loads: int = 0
    evictions: int = 0
    expiries: int = 0
    busy: dict[str, float] = field(default_factory=dict)
    """Emulated seconds each GPU was busy (some sequence in prefill or decode on it)."""
    load_events: list[tuple[float, int, str]] = field(default_factory=list)
    """(virtual s, index of the backend, model) of each load seen."""
    samples: int = 0
    failed_polls: int = 0


def _expires(text: str) -> datetime:
    """Go's RFC 3339 with any fraction, as fromisoformat of Python 3.10 accepts it."""
    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return datetime.max.replace(tzinfo=timezone.utc)
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    fraction = (m.group(2) or "0")[:6].ljust(6, "0")
    try:
        return datetime.fromisoformat(f"{m.group(1)}.{fraction}{zone}")
    except ValueError:
        return datetime.max.replace(tzinfo=timezone.utc)


class Sampler:
    """Polls the backends once per emulated second (the utilization window of /gpus)."""

    def __init__(self, session: aiohttp.ClientSession, running: Running, speed: float) -> None:
        self._session = session
        self._backends = running.backends
        self._speed = speed
        self._present: dict[str, dict[str, datetime]] = {b: {} for b in running.backends}
        self.watch = Watch()
        self._t0 = time.monotonic()
        self._last: float | None = None

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self._speed

    async def run(self) -> None:
        tick = 1.0 / self._speed
        while True:
            started = time.monotonic()
            await self.sample()
            await asyncio.sleep(max(tick - (time.monotonic() - started), tick / 4))

    async def sample(self) -> None:
        t = self.now()
        results = await asyncio.gather(
            *(self._poll(b) for b in self._backends), return_exceptions=True
        )
        dt = min(t - self._last, 1.0) if self._last is not None else 0.0
        self._last = t
        wall = datetime.now(timezone.utc)
        grace = 2.0 / self._speed
        w = self.watch
        w.samples += 1
        for backend, result in zip(self._backends, results, strict=True):
            if isinstance(result, BaseException):
                w.failed_polls += 1
                continue
            ps, gpus = result
            now_loaded = {
                str(m.get("name")): _expires(str(m.get("expires_at", "")))
                for m in ps.get("models") or []
            }
            before = self._present[backend]
            for model in now_loaded.keys() - before.keys():
                w.loads += 1
                index = self._backends.index(backend)
                w.load_events.append((round(t, 1), index, model))
            for model in before.keys() - now_loaded.keys():
                if (before[model] - wall).total_seconds() > grace:
                    w.evictions += 1
                else:
                    w.expiries += 1
            self._present[backend] = now_loaded
            for gpu in gpus.get("gpus") or []:
                name = str(gpu.get("name"))
                w.busy[name] = w.busy.get(name, 0.0) + float(gpu.get("utilization", 0.0)) * dt

    async def _poll(self, backend: str) -> tuple[dict[str, Any], dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=5)

        async def get(path: str) -> dict[str, Any]:
            async with self._session.get(backend + path, timeout=timeout) as resp:
                data: dict[str, Any] = await resp.json(content_type=None)
                return data

        ps, gpus = await asyncio.gather(get("/api/ps"), get("/gpus"))
        return ps, gpus


class Progress:
    """A one-line progress bar on stderr (a line every few seconds when stderr is no terminal)."""

    def __init__(self, label: str, total: int, *, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = enabled
        self._tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, inflight: int, t: float, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < (0.5 if self._tty else 10.0):
            return
        self._last = now
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"  {self.label:34} [{bar}] {self.done:5}/{self.total} done, "
            f"{inflight:4} in flight, t={t:6.0f}s"
        )
        end = "\n" if final or not self._tty else ""
        sys.stderr.write(("\r" if self._tty else "") + line + end)
        sys.stderr.flush()


async def replay(
    scenario: Scenario,
    running: Running,
    *,
    deadline: float,
    progress: Progress,
) -> tuple[list[Result], Watch]:
    """Send the scenario's requests to ``running``; stop waiting at ``deadline`` virtual s."""
    speed = scenario.speed
    results = [Result(req=r) for r in scenario.requests]
    followers: dict[int, list[Req]] = defaultdict(list)
    for r in scenario.requests:
        if r.after is not None:
            followers[r.after].append(r)
    tasks: set[asyncio.Task[None]] = set()
    finished = asyncio.Event()
    count = {"done": 0, "inflight": 0}
    bodies = {r.id: openai_body(r.body) for r in scenario.requests} if running.api != NATIVE else {}
    headers = {**JSON_HEADERS, **running.headers}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        sampler = Sampler(session, running, speed)
        loop = asyncio.get_running_loop()
        start = loop.time()

        def now() -> float:
            return (loop.time() - start) * speed

        def spawn(req: Req, delay: float) -> None:
            task = loop.create_task(send(req, delay))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def send(req: Req, delay: float) -> None:
            if delay > 0:
                await asyncio.sleep(delay / speed)
            res = results[req.id]
            res.backend = running.pick(req)
            res.sent = now()
            count["inflight"] += 1
            try:
                await _exchange(
                    session,
                    res,
                    now,
                    api=running.api,
                    body=bodies.get(req.id),
                    headers=request_headers(req, headers),
                )
            except asyncio.CancelledError:
                res.done = None
                raise
            except Exception as exc:  # any failure of one request is its result, not the run's
                res.error = f"{type(exc).__name__}: {exc}"
                res.done = now()
            finally:
                count["inflight"] -= 1
            count["done"] += 1
            progress.done = count["done"]
            for nxt in followers.get(req.id, ()):
                spawn(nxt, nxt.think)
            if count["done"] == len(results):
                finished.set()

        sampling = loop.create_task(sampler.run())

        async def arrivals() -> None:
            for req in sorted((r for r in scenario.requests if r.after is None), key=_at):
                wait = start + req.at / speed - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                spawn(req, 0.0)

        feeding = loop.create_task(arrivals())

        async def show() -> None:
            while True:
                progress.show(count["inflight"], now())
                await asyncio.sleep(0.25)

        showing = loop.create_task(show())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(finished.wait(), timeout=deadline / speed)
        for task in (feeding, *tasks, showing):
            task.cancel()
        await asyncio.gather(feeding, *tasks, showing, return_exceptions=True)
        await sampler.sample()  # one last look at what stayed loaded
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        progress.show(count["inflight"], now(), final=True)
    return results, sampler.watch


def request_headers(req: Req, headers: dict[str, str]) -> dict[str, str]:
    """``headers``, and ``X-OpenWebUI-User-Id`` when ``req`` names its user."""
    return {**headers, USER_HEADER: req.user} if req.user else headers


def _at(req: Req) -> float:
    return req.at


async def _exchange(
    session: aiohttp.ClientSession,
    res: Result,
    now: Any,
    *,
    api: str = NATIVE,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """One request: time to its first byte, its end, and the final line's metrics (on the
    OpenAI endpoint with ``api``, sending ``body``, the request as OpenAI's)."""
    req = res.req
    url = res.backend + PATHS[api]
    async with session.post(url, data=body or req.body, headers=headers or JSON_HEADERS) as resp:
        res.status = resp.status
        tail = b""
        async for chunk in resp.content.iter_any():
            if res.first is None and chunk:
                res.first = now()
            tail = (tail + chunk)[-_TAIL:]
        res.done = now()
    if resp.status != 200:
        res.error = f"HTTP {resp.status}: {tail[:200].decode(errors='replace')}"
        return
    if api != NATIVE:
        answer = read_answer(tail, stream=req.stream)
        res.error = answer.error
        res.eval_count, res.prompt_eval_count = answer.completion_tokens, answer.prompt_tokens
        return
    last = next((ln for ln in reversed(tail.split(b"\n")) if ln.strip()), b"")
    try:
        final = json.loads(last)
    except ValueError:
        res.error = "the answer did not end with a JSON line"
        return
    if not isinstance(final, dict) or final.get("error"):
        res.error = str(final.get("error") if isinstance(final, dict) else final)[:200]
        return
    if not final.get("done"):
        res.error = "the stream ended without its final line"
        return
    res.eval_count = int(final.get("eval_count") or 0)
    res.prompt_eval_count = int(final.get("prompt_eval_count") or 0)
    res.load_duration = int(final.get("load_duration") or 0) / 1e9


def write_requests(results: list[Result], path: Path) -> None:
    """One CSV line per request: what it was, when it went out, first byte, end (emulated s)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(
            ["id", "kind", "model", "stream", "prompt_tokens", "output_tokens", "at", "after",
             "sent", "first", "done", "ttft", "e2e", "eval_count", "load_duration", "error",
             "user"]
        )  # fmt: skip
        for r in results:
            q = r.req
            ttft = r.first - r.sent if r.first is not None and r.sent is not None else None
            e2e = r.done - r.sent if r.done is not None and r.sent is not None else None
            out.writerow(
                [q.id, q.kind, q.model, q.stream, q.prompt_tokens, q.output_tokens, q.at,
                 "" if q.after is None else q.after, _f(r.sent), _f(r.first), _f(r.done),
                 _f(ttft), _f(e2e), r.eval_count, _f(r.load_duration), r.error, q.user]
            )  # fmt: skip


def _f(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
