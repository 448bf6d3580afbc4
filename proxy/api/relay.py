"""Routes one model request: queue for a slot, forward, retry once before the first byte, relay.

Everything about the request that is not needed to route it is left to the instance: a body that
is not JSON, a missing or unknown model, a bad option, all go to one instance as they came, so the
client gets exactly Ollama's status and error text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from proxy.api.access import CLIENT_GONE, Access, accounted, begin, body_model
from proxy.api.context import PROXY, Proxy
from proxy.api.http import error_body, error_response
from proxy.balancer.queue import Lease
from proxy.balancer.state import InstanceState
from proxy.errors import UpstreamConnectError, UpstreamError, UpstreamStatus
from proxy.forward import StreamWatcher
from proxy.names import model_key

log = logging.getLogger("ollamux.access")

ATTEMPTS = 2
"""One try plus one retry on another instance, only before the first byte."""
SESSION_HEADER = "X-OpenWebUI-Chat-Id"
STREAM_TYPES = ("application/x-ndjson", "text/event-stream")


@dataclass(frozen=True)
class ModelRequest:
    """The little the proxy reads from a request body to route it."""

    model: str
    session: str
    unload: bool
    """An empty prompt with keep_alive 0: Ollama's way to unload a model."""


def parse(body: bytes, headers: Any) -> ModelRequest | None:
    """The model and session of a JSON body, or None when the body is for the instance to judge."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not isinstance(model, str) or not model:
        return None
    messages = data.get("messages")
    session = headers.get(SESSION_HEADER, "")
    if not session and isinstance(messages, list) and messages:
        session = _conversation_key(model, messages)
    empty = not data.get("prompt") and not messages
    keep_alive = data.get("keep_alive")
    unload = empty and keep_alive in (0, "0", "0s", 0.0) and "input" not in data
    return ModelRequest(model=model, session=session, unload=unload)


def _conversation_key(model: str, messages: list[Any]) -> str:
    """Messages up to the first user turn: the same for every turn of one conversation."""
    head = []
    for message in messages:
        head.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    first = json.dumps(head, sort_keys=True, default=str).encode()
    return hashlib.sha256(model.encode() + first).hexdigest()[:16]


async def handle(request: web.Request) -> web.StreamResponse:
    """Any request that names a model in its JSON body: /api/chat, /v1/chat/completions, ..."""
    proxy = request.app[PROXY]
    body = await request.read()
    info = parse(body, request.headers)
    if info is None or not proxy.book.known(info.model):
        return await passthrough(request, body)
    with accounted(proxy, begin(proxy, request, info.model)) as access:
        if info.unload:
            return await _unload_everywhere(request, body, info, access)
        return await _routed(proxy, request, body, info, access)


async def _routed(
    proxy: Proxy, request: web.Request, body: bytes, info: ModelRequest, access: Access
) -> web.StreamResponse:
    label = access.model_label
    tried: list[str] = []
    failure: UpstreamError | None = None
    for attempt in range(ATTEMPTS):
        lease = await proxy.dispatcher.acquire(info.model, session=info.session, exclude=tried)
        proxy.metrics.queue_wait.labels(label).observe(lease.queued_s)
        access.instance, access.reason = lease.instance.name, lease.decision.reason
        access.queue_wait = (access.queue_wait or 0.0) + lease.queued_s
        if attempt:
            proxy.metrics.retries.inc()
        try:
            resp = await proxy.fwd().open(
                lease.instance, request.method, request.path_qs, request.headers, body
            )
        except UpstreamError as exc:
            proxy.dispatcher.release(lease)
            _count_failure(proxy, lease.instance, exc)
            tried.append(lease.instance.name)
            failure = exc
            continue
        access.status = resp.status
        return await _relay(proxy, request, resp, lease, access)
    assert failure is not None
    access.error = failure.message
    if isinstance(failure, UpstreamStatus):
        access.status = failure.status
        return web.Response(status=failure.status, body=failure.body, headers=failure.headers)
    access.status = 502
    return error_response(request.path, 502, f"no instance could answer: {failure.message}")


async def _relay(
    proxy: Proxy,
    request: web.Request,
    resp: aiohttp.ClientResponse,
    lease: Lease,
    access: Access,
) -> web.StreamResponse:
    inst = lease.instance
    proxy.dispatcher.loaded(lease)
    watcher = StreamWatcher()
    broken: str | None = None
    try:
        out, broken = await proxy.fwd().relay(resp, request, watcher)
    finally:
        resp.close()  # also on cancellation: dropping the connection stops the generation
        proxy.dispatcher.release(lease)
    duration = time.monotonic() - access.started
    ttft = (watcher.first_byte - access.started) if watcher.first_byte else None
    streamed = out.headers.get("Content-Type", "").startswith(STREAM_TYPES)
    access.ttft = ttft
    access.prompt_tokens, access.eval_tokens = _account(
        proxy, lease, access.model_label, watcher.final, duration, ttft, streamed=streamed
    )
    if broken:
        proxy.metrics.upstream_errors.labels(inst.name, "midstream").inc()
        access.error = broken
    access.status = out.status
    if watcher.client_gone:
        access.status, access.error = CLIENT_GONE, "the client went away"
    return out


def _account(
    proxy: Proxy,
    lease: Lease,
    label: str,
    final: dict[str, Any] | None,
    duration: float,
    ttft: float | None,
    *,
    streamed: bool,
) -> tuple[int | None, int | None]:
    """Histograms, load/service timings and token counts; returns (prompt, eval) tokens."""
    metrics = proxy.metrics
    metrics.duration.labels(label).observe(duration)
    if ttft is not None:
        metrics.ttft.labels(label).observe(ttft)
        lease.instance.recent_ttft.append(ttft)
    # Timings are learned in the proxy's own clock (an emulator may run compressed time): a warm
    # request's slot time is its service time; a cold stream's first byte bounds its load time.
    stats = proxy.book.stats(lease.model)
    if lease.cold:
        metrics.model_loads.labels(lease.instance.name, label).inc()
        if streamed and ttft is not None:
            stats.observe_load(max(ttft - lease.queued_s, 0.0))
    else:
        stats.observe_service(max(duration - lease.queued_s, 0.0))
    if not final:
        return None, None
    usage = final.get("usage") if isinstance(final.get("usage"), dict) else None
    prompt = final.get("prompt_eval_count") or (usage or {}).get("prompt_tokens") or 0
    generated = final.get("eval_count") or (usage or {}).get("completion_tokens") or 0
    if prompt:
        metrics.tokens.labels(lease.instance.name, label, "prompt").inc(prompt)
    if generated:
        metrics.tokens.labels(lease.instance.name, label, "eval").inc(generated)
    return int(prompt), int(generated)


def _count_failure(proxy: Proxy, inst: InstanceState, exc: UpstreamError) -> None:
    proxy.metrics.upstream_errors.labels(inst.name, exc.kind).inc()
    if proxy.monitor is not None:
        proxy.monitor.report_failure(inst, connect=isinstance(exc, UpstreamConnectError))
    log.warning("instance %s failed before the first byte: %s", inst.name, exc.message)


async def passthrough(request: web.Request, body: bytes | None = None) -> web.StreamResponse:
    """Send the request as is to one healthy instance (the one that has the model, if any)."""
    proxy = request.app[PROXY]
    if body is None:
        body = await request.read()
    with accounted(proxy, begin(proxy, request, body_model(body), reason="passthrough")) as access:
        return await _pass(proxy, request, body, access)


async def _pass(
    proxy: Proxy, request: web.Request, body: bytes, access: Access
) -> web.StreamResponse:
    targets = proxy.healthy()
    if not targets:
        access.status, access.reason = 503, "no_instance"
        return error_response(
            request.path, 503, "no healthy Ollama instance is available", {"Retry-After": "5"}
        )
    last: UpstreamError | None = None
    for inst in targets[:ATTEMPTS]:
        access.instance = inst.name
        try:
            resp = await proxy.fwd().open(
                inst, request.method, request.path_qs, request.headers, body
            )
        except UpstreamError as exc:
            _count_failure(proxy, inst, exc)
            last = exc
            continue
        access.status = resp.status
        watcher = StreamWatcher()
        try:
            out, broken = await proxy.fwd().relay(resp, request, watcher)
        finally:
            resp.close()
        access.error = broken or ""
        if watcher.client_gone:
            access.status, access.error = CLIENT_GONE, "the client went away"
        return out
    access.error = last.message if last else "no instance answered"
    if isinstance(last, UpstreamStatus):
        access.status = last.status
        return web.Response(status=last.status, body=last.body, headers=last.headers)
    access.status = 502
    return web.Response(
        status=502,
        body=error_body(request.path, 502, access.error),
        content_type="application/json",
    )


async def _unload_everywhere(
    request: web.Request, body: bytes, info: ModelRequest, access: Access
) -> web.StreamResponse:
    """keep_alive 0 with an empty prompt unloads the model on every instance that has it."""
    proxy = request.app[PROXY]
    model = model_key(info.model)
    holders = [i for i in proxy.healthy() if model in i.loaded] or proxy.healthy()[:1]
    access.reason = "unload"
    if not holders:
        access.status = 503
        return error_response(
            request.path, 503, "no healthy Ollama instance is available", {"Retry-After": "5"}
        )
    access.instance = holders[0].name if len(holders) == 1 else "all"
    session = proxy.client()
    headers = {"Content-Type": "application/json"}

    async def one(inst: InstanceState) -> tuple[int, bytes]:
        async with session.post(inst.url + request.path, data=body, headers=headers) as resp:
            return resp.status, await resp.read()

    results = await asyncio.gather(*(one(i) for i in holders), return_exceptions=True)
    for inst in holders:
        inst.loaded.pop(model, None)
    answered = [r for r in results if isinstance(r, tuple)]
    if not answered:
        access.status = 502
        return error_response(request.path, 502, "no instance answered the unload")
    status, payload = answered[0]
    access.status = status
    return web.Response(
        status=status, body=payload, content_type="application/json", charset="utf-8"
    )
