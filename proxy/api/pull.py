"""``/api/pull`` single-flight: one download per model into the shared store, progress to all.

The instances share one model directory, and Ollama has no cross-process lock on it (ollama.md §8),
so two instances pulling the same model at once could corrupt it. The proxy sends one pull to one
instance and streams its progress to every client that asks for the same model meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from aiohttp import web

from proxy.api.access import accounted, begin
from proxy.api.body import request_body
from proxy.api.context import PROXY, Proxy
from proxy.api.error_replies import error_response
from proxy.api.passthrough import passthrough
from proxy.balancer.state import InstanceState
from proxy.names import is_valid, normalize

log = logging.getLogger("ollamux.proxy")


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
            inst = proxy.router.routable()[0]
            job = pulls[key] = _Pull(instance=inst.name)
            upstream_body = json.dumps({**data, "stream": True}).encode()
            job.task = asyncio.get_running_loop().create_task(_run(proxy, inst, job, upstream_body))
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


async def _run(proxy: Proxy, inst: InstanceState, job: _Pull, body: bytes) -> None:
    """Pull through ``inst`` (the first healthy one); it keeps going if every client leaves."""
    try:
        async with proxy.client().post(inst.url + "/api/pull", data=body) as resp:
            if resp.status != 200:
                text = (await resp.read()).strip() or b'{"error":"pull failed"}'
                job.add(text)
                return
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        job.add(line)
            if buffer.strip():
                job.add(buffer)
    except Exception as exc:  # the clients get Ollama's error line; only the log has the details
        log.warning("pull through instance %s failed: %r", inst.name, exc)
        message = f"pull failed: instance {inst.name} stopped answering"
        job.add(json.dumps({"error": message}).encode())
    finally:
        job.finish()
        if proxy.monitor is not None:
            await proxy.monitor.refresh_tags()


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
