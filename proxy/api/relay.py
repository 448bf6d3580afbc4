"""Routes one model request: lease a slot, forward, retry on other instances, relay the answer.

HTTP only: the router (``balancer/router.py``) owns the lease and every state change; this module
says what happened (``lease.outcome``) and moves bytes. A request is tried on up to
``routing.attempts`` distinct instances until its first byte reaches the client. A non-streamed
generation is asked of the instance as a stream and assembled here (``proxy/assemble``), so its
progress is watched like a stream's and a hang is told from a long answer; since the client has
received nothing until it is whole, even a break in the middle is retried elsewhere.

Everything about the request that is not needed to route it is left to the instance: a body that
is not JSON, a missing or unknown model, a bad option, all go to one instance as they came, so the
client gets exactly Ollama's status and error text.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy import assemble
from proxy.api.access import Access, accounted, begin, count_failure, went_away
from proxy.api.auth import KEY_NAME
from proxy.api.body import ModelRequest, off_loop, parse_model_request, request_body
from proxy.api.context import PROXY, Proxy
from proxy.api.error_replies import error_body
from proxy.api.passthrough import given_up, passthrough, unload_everywhere
from proxy.balancer.dispatcher import Lease
from proxy.balancer.state import Outcome
from proxy.errors import UpstreamBroken, UpstreamError
from proxy.forward import BROKEN, Exchange, StreamWatcher, copy

USER_HEADER = "X-OpenWebUI-User-Id"
PRIORITY_HEADER = "X-Ollamux-Priority"
_GENERATES = ("/v1/responses", "/v1/messages", "/api/chat", "/api/generate", "/v1/completions")


async def handle(request: web.Request) -> web.StreamResponse:
    """Any request that names a model in its JSON body: /api/chat, /v1/chat/completions, ..."""
    proxy = request.app[PROXY]
    body = await request_body(request)
    info = await parse_model_request(body, request.headers, request.path)
    if info is None or not proxy.router.holders(info.model):
        return await passthrough(request, body)  # the instance answers as Ollama does
    with accounted(proxy, begin(proxy, request, info.model)) as access:
        if info.unload:
            return await unload_everywhere(request, body, info.model, access)
        return await _routed(proxy, request, body, info, access)


async def _routed(
    proxy: Proxy, request: web.Request, body: bytes, info: ModelRequest, access: Access
) -> web.StreamResponse:
    router = proxy.router
    rebuilt = None
    if not info.stream:
        rebuilt = await off_loop(len(body), assemble.upstream_body, request.path, info.data)
    silent = not info.stream and rebuilt is None and request.path.startswith(_GENERATES)
    user = who(request)
    background = is_background(request, info)
    tried: list[str] = []
    waited = 0.0  # the queue's wait is one budget for all tries (queue.timeout)
    failures = 0  # routing.attempts bounds the tries that failed; a stale model list is no failure
    while True:
        if tried:
            proxy.metrics.retries.inc()
        wait = proxy.config.queue.timeout - waited
        async with router.lease(
            info.model,
            session=info.session,
            exclude=tried,
            wait=wait,
            user=user,
            background=background,
            num_ctx=info.num_ctx,
        ) as lease:
            waited += lease.queued_s
            inst = lease.instance
            access.instance, access.reason = inst.name, lease.decision.reason
            access.queue_wait = (access.queue_wait or 0.0) + lease.queued_s
            proxy.metrics.queue_wait.labels(access.model_label).observe(lease.queued_s)
            limits = router.deadlines(lease, prompt_bytes=len(body), silent=silent)
            exchange = proxy.exchange(inst)
            with router.watching(inst, exchange):
                try:
                    resp = await exchange.open(
                        request.method,
                        request.path_qs,
                        request.headers,
                        rebuilt if rebuilt is not None else body,
                        first=limits.first,
                        idle=limits.idle,
                    )
                    if resp.status == 404:
                        answer = await _read_error(resp)
                        if _elsewhere(proxy, lease, answer, tried):
                            tried.append(inst.name)
                            continue
                        access.status = 404
                        content_type = resp.headers.get("Content-Type", "application/json")
                        return web.Response(
                            status=404, body=answer, headers={"Content-Type": content_type}
                        )
                    if rebuilt is not None and resp.status < 300:
                        return await _assembled(
                            proxy, request, info.data, exchange, resp, lease, access
                        )
                    return await _streamed(proxy, request, exchange, resp, lease, access)
                except UpstreamError as exc:  # nothing reached the client: try elsewhere
                    lease.outcome = Outcome(exc.kind)
                    count_failure(proxy, inst, exc)
                    tried.append(inst.name)
                    failures += 1
                    if failures >= proxy.config.routing.attempts:
                        return given_up(request, access, exc)
                finally:
                    exchange.close()


async def _streamed(
    proxy: Proxy,
    request: web.Request,
    exchange: Exchange,
    resp: aiohttp.ClientResponse,
    lease: Lease,
    access: Access,
) -> web.StreamResponse:
    """Relay the answer as it comes; a break after the first byte ends it with an error line."""
    watcher = StreamWatcher(on_final=lambda: proxy.router.answered(lease))
    lease.outcome = Outcome.OK
    out, broken = await copy(
        request, exchange, resp, watcher, lambda: _started(proxy, lease, resp.status)
    )
    lease.final = watcher.final
    access.status = out.status
    if watcher.client_gone:
        lease.outcome = Outcome.CLIENT_GONE
        went_away(access)
    elif broken is not None or watcher.error is not None:
        lease.outcome = Outcome.MIDSTREAM
        if broken is not None:
            count_failure(proxy, lease.instance, broken, kind="midstream")
        else:
            proxy.metrics.upstream_errors.labels(lease.instance.name, "midstream").inc()
        access.error = f"{lease.instance.name} {broken.message}" if broken else watcher.error or ""
    _account(proxy, lease, access, watcher)
    return out


async def _assembled(
    proxy: Proxy,
    request: web.Request,
    info: dict[str, Any],
    exchange: Exchange,
    resp: aiohttp.ClientResponse,
    lease: Lease,
    access: Access,
) -> web.Response:
    """Read the instance's stream whole and answer it in one piece, as Ollama does unstreamed.

    A stream that breaks or carries an error line raises UpstreamBroken: the client has nothing
    yet, so the caller may try another instance.
    """
    watcher = StreamWatcher()
    builder = assemble.Assembler(request.path, info)
    builder.start(resp.status, resp.headers.get("Content-Type", ""))
    async for chunk in exchange.chunks(resp):
        watcher.feed(chunk)
        builder.feed(chunk)
        if watcher.tokens:
            _started(proxy, lease, resp.status)
    watcher.close()  # a last line without its newline is read here
    if watcher.tokens:
        _started(proxy, lease, resp.status)
    status, body, content_type = builder.result()
    name = lease.instance.name
    if builder.error is not None:
        raise UpstreamBroken(name, builder.error, status, body, {"Content-Type": content_type})
    if not builder.done:
        raise UpstreamBroken(
            name,
            "broke off its answer",
            502,
            error_body(request.path, 502, BROKEN),
            {"Content-Type": "application/json; charset=utf-8"},
        )
    lease.outcome, lease.final = Outcome.OK, watcher.final
    access.status = status
    _account(proxy, lease, access, watcher)
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


def who(request: web.Request) -> str:
    """The user a request waits for its turn as: Open WebUI's user id, else the API key's name,
    else the client's address."""
    return (
        request.headers.get(USER_HEADER, "") or request.get(KEY_NAME, "") or (request.remote or "")
    )


def is_background(request: web.Request, info: ModelRequest) -> bool:
    """Whether the request gives way to interactive ones while it waits: ``X-Ollamux-Priority``
    says so, else a non-streamed generation is background (nobody watches it come)."""
    said = request.headers.get(PRIORITY_HEADER, "").strip().lower()
    if said in ("interactive", "background"):
        return said == "background"
    return not info.stream


async def _read_error(resp: aiohttp.ClientResponse) -> bytes:
    """The body of an error answer (small: Ollama's one JSON object); empty if it breaks."""
    try:
        return await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return b""


def _elsewhere(proxy: Proxy, lease: Lease, answer: bytes, tried: list[str]) -> bool:
    """The instance does not have the model after all (its list was stale): whether another
    instance not ``tried`` may have it. The stale list is corrected and re-read meanwhile."""
    if b"not found" not in answer:
        return False
    lease.outcome = Outcome.OK  # the instance did nothing wrong: its store changed
    inst = lease.instance
    if proxy.monitor is not None:
        proxy.monitor.recheck_models(inst)
    return proxy.router.not_found(inst, lease.model, tried=tried)


def _started(proxy: Proxy, lease: Lease, status: int) -> None:
    if status < 300 and not lease.started:
        proxy.router.started(lease)


def _account(proxy: Proxy, lease: Lease, access: Access, watcher: StreamWatcher) -> None:
    """Histograms and token counts of one answered request."""
    metrics, label, name = proxy.metrics, access.model_label, lease.instance.name
    metrics.duration.labels(label).observe(time.monotonic() - access.started)
    if watcher.first_byte is not None:
        access.ttft = watcher.first_byte - access.started
        metrics.ttft.labels(label).observe(access.ttft)
    if lease.cold and lease.started:
        metrics.model_loads.labels(name, label).inc()
    final = watcher.final
    if not final:
        return
    usage = final.get("usage") if isinstance(final.get("usage"), dict) else None
    prompt = final.get("prompt_eval_count") or (usage or {}).get("prompt_tokens") or 0
    generated = final.get("eval_count") or (usage or {}).get("completion_tokens") or 0
    if prompt:
        metrics.tokens.labels(name, label, "prompt").inc(prompt)
    if generated:
        metrics.tokens.labels(name, label, "eval").inc(generated)
    access.prompt_tokens, access.eval_tokens = int(prompt), int(generated)
