"""Ollama's native API through the proxy: routed model calls and merged answers of all instances."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.api import blobs, pull, relay
from proxy.api.context import PROXY, Proxy
from proxy.api.passthrough import passthrough, to_every_store
from proxy.balancer.state import InstanceState

FANOUT_TIMEOUT = 3.0
"""A dead or hung instance must not stall the model list: it is left out after this long."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", root, allow_head=True),
        web.get("/api/version", version, allow_head=True),
        web.get("/api/tags", tags, allow_head=True),
        web.get("/api/ps", ps),
        web.post("/api/generate", relay.handle),
        web.post("/api/chat", relay.handle),
        web.post("/api/embed", relay.handle),
        web.post("/api/embeddings", relay.handle),
        web.post("/api/show", passthrough),
        web.post("/api/pull", pull.handle),
        web.post("/api/push", passthrough),
        web.post("/api/create", _then_refresh(passthrough)),
        web.post("/api/copy", to_every_store),
        web.delete("/api/delete", to_every_store),
        web.head("/api/blobs/{digest}", passthrough),
        web.post("/api/blobs/{digest}", blobs.upload),  # streamed, not held to max_body
    ]


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def fan_out(proxy: Proxy, path: str) -> list[tuple[InstanceState, Any]]:
    """GET ``path`` from every healthy instance at once; those that fail or lag are left out."""
    session = proxy.client()
    timeout = aiohttp.ClientTimeout(total=FANOUT_TIMEOUT)

    async def one(inst: InstanceState) -> tuple[InstanceState, Any]:
        async with session.get(inst.url + path, timeout=timeout, headers=inst.auth()) as resp:
            resp.raise_for_status()
            return inst, await resp.json(content_type=None)

    results = await asyncio.gather(
        *(one(i) for i in proxy.router.routable()), return_exceptions=True
    )
    return [r for r in results if isinstance(r, tuple)]


def json_response(data: Any, status: int = 200) -> web.Response:
    body = json.dumps(data, separators=(",", ":"))
    return web.Response(status=status, text=body, content_type="application/json", charset="utf-8")


async def tags(request: web.Request) -> web.Response:
    """The union of every instance's models, one entry per name and digest, newest first."""
    proxy = request.app[PROXY]
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for _inst, data in await fan_out(proxy, "/api/tags"):
        for entry in data.get("models") or []:
            seen.setdefault((entry.get("name", ""), entry.get("digest", "")), entry)
    models = sorted(seen.values(), key=lambda m: str(m.get("modified_at", "")), reverse=True)
    return json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    """Every instance's loaded models, each marked with the instance and GPUs it runs on."""
    proxy = request.app[PROXY]
    models = []
    for inst, data in await fan_out(proxy, "/api/ps"):
        for entry in data.get("models") or []:
            models.append({**entry, "instance": inst.name, "gpus": list(inst.gpu_uuids)})
    models.sort(key=lambda m: str(m.get("expires_at", "")), reverse=True)
    return json_response({"models": models})


async def version(request: web.Request) -> web.Response:
    """The lowest version among the instances: what every request can rely on."""
    proxy = request.app[PROXY]
    versions = [str(d.get("version", "")) for _i, d in await fan_out(proxy, "/api/version")]
    versions = [v for v in versions if v] or [i.version for i in proxy.instances if i.version]
    if not versions:
        return web.Response(
            status=503,
            text='{"error":"no healthy Ollama instance is available"}',
            content_type="application/json",
        )
    return json_response({"version": min(versions, key=_version_key)})


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def _then_refresh(handler: Handler) -> Handler:
    """Model-store changes: once the instance answered, re-read the model lists."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        monitor = request.app[PROXY].monitor
        if monitor is not None and response.status < 300:
            await monitor.refresh_tags()
        return response

    return wrapped
