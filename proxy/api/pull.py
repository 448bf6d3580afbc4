"""``/api/pull`` single-flight: one download per model into each model store, progress to all.

Instances launched on one box share one model directory, and Ollama has no cross-process lock on
it (ollama.md §8), so two instances pulling the same model into it at once could corrupt it. The
proxy sends one pull to one instance of each store (instances on other hosts have stores of their
own) and streams the progress of the first to every client that asks for the same model
meanwhile; the final ``success`` comes once every store has the model, else the error of one
that failed, naming its instance (pulling again finishes at once where the model already is).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from proxy.api.access import accounted, begin
from proxy.api.body import request_body
from proxy.api.context import PROXY, Proxy
from proxy.api.error_replies import error_response, error_text
from proxy.api.passthrough import passthrough
from proxy.balancer.state import InstanceState
from proxy.names import is_valid, normalize

log = logging.getLogger("ollamux.proxy")
_SUCCESS = b'{"status":"success"}'


def _ignore(line: bytes) -> None:
    """Progress of stores other than the first: not shown (their bars would fight)."""


@dataclass(eq=False)
class _Pull:
    instance: str = ""
    lines: list[bytes] = field(default_factory=list)
    done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def add(self, line: bytes) -> None:
        self.lines.append(line)
        self.changed.set()

    def finish(self) -> None:
        self.done = True
        self.changed.set()


async def handle(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY]
    body = await request_body(request)
    try:
        data = json.loads(body)
        name = data.get("model") or data.get("name")
        stream = data.get("stream", True) is not False
    except (ValueError, AttributeError):
        return await passthrough(request, body)
    if not isinstance(name, str) or not is_valid(name) or not proxy.router.routable():
        return await passthrough(request, body)
    key = normalize(name).lower()
    pulls: dict[str, _Pull] = proxy.pulls
    job = pulls.get(key)
    with accounted(proxy, begin(proxy, request, name, reason="pull_joined")) as access:
        if job is None or job.done:
            stores: dict[str, InstanceState] = {}
            for inst in proxy.router.routable():
                stores.setdefault(inst.store, inst)  # one instance of each store
            targets = list(stores.values())
            job = pulls[key] = _Pull(instance=targets[0].name if len(targets) == 1 else "all")
            upstream_body = json.dumps({**data, "stream": True}).encode()
            job.task = asyncio.get_running_loop().create_task(
                _run(proxy, targets, job, upstream_body)
            )
            access.reason = "pull"
        access.instance = job.instance
        response = await _answer(request, job, stream=stream)
        access.status = response.status
        return response


async def _answer(request: web.Request, job: _Pull, *, stream: bool) -> web.StreamResponse:
    """The pull's progress as it comes (or its summary), however many clients asked for it."""
    if not stream:
        while not job.done:
            job.changed.clear()
            await job.changed.wait()
        return _summary(request, job)
    out = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await out.prepare(request)
    sent = 0
    while True:
        while sent < len(job.lines):
            await out.write(job.lines[sent] + b"\n")
            sent += 1
        if job.done:
            break
        job.changed.clear()
        if sent == len(job.lines):
            await job.changed.wait()
    await out.write_eof()
    return out


async def _run(proxy: Proxy, targets: list[InstanceState], job: _Pull, body: bytes) -> None:
    """Pull through every target at once; it keeps going if every client leaves."""
    try:
        lead, *others = targets
        errors = await asyncio.gather(
            _pull_one(proxy, lead, body, job.add), *(_pull_one(proxy, i, body) for i in others)
        )
        failed = [(inst, error) for inst, error in zip(targets, errors, strict=True) if error]
        if failed:
            inst, error = failed[0]
            where = f" on instance {inst.name}" if len(targets) > 1 else ""
            job.add(json.dumps({"error": f"{error}{where}"}).encode())
        else:
            job.add(_SUCCESS)
    finally:
        job.finish()
        if proxy.monitor is not None:
            await proxy.monitor.refresh_tags()


async def _pull_one(
    proxy: Proxy, inst: InstanceState, body: bytes, show: Callable[[bytes], None] = _ignore
) -> str | None:
    """One store's pull through ``inst``: its progress lines (but ``success``) go to ``show``;
    returns None when it succeeded, else Ollama's error text."""
    last: dict[str, object] = {}
    try:
        async with proxy.client().post(
            inst.url + "/api/pull", data=body, headers=inst.auth()
        ) as resp:
            if resp.status != 200:
                return error_text((await resp.read()).strip()) or "pull failed"
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    last = _line(line, show) or last
            last = _line(buffer, show) or last  # a last line without its newline
    except Exception as exc:  # the clients get Ollama's error line; only the log has the details
        log.warning("pull through instance %s failed: %r", inst.name, exc)
        return f"pull failed: instance {inst.name} stopped answering"
    if "error" in last:
        return str(last["error"])
    return None if last.get("status") == "success" else "pull failed: the answer broke off"


def _line(line: bytes, show: Callable[[bytes], None]) -> dict[str, object] | None:
    """One progress line: shown unless it is the final success (sent once every store is done)."""
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        show(line)
        return None
    if data.get("status") != "success":
        show(line)
    return data


def _summary(request: web.Request, job: _Pull) -> web.Response:
    """stream:false: the last status, or the error with 500 as Ollama answers it."""
    last = json.loads(job.lines[-1]) if job.lines else {"error": "pull failed"}
    if "error" in last:
        return error_response(request.path, 500, str(last["error"]))
    return web.Response(
        text=json.dumps(last, separators=(",", ":")),
        content_type="application/json",
        charset="utf-8",
    )
