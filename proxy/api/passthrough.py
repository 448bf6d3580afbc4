"""Requests the router does not place: sent as they came to one instance, or to all holders.

A passthrough goes to the first routable instance and, if it cannot be reached, to the next (up
to ``routing.attempts``), so the client gets Ollama's own answer byte for byte. An unload
(``keep_alive: 0`` with an empty prompt) goes to every instance that has the model loaded, since
the client sees one Ollama.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.api.access import Access, accounted, begin, body_model, count_failure, went_away
from proxy.api.body import request_body
from proxy.api.context import PROXY, Proxy
from proxy.api.error_replies import error_response
from proxy.balancer.state import InstanceState, Outcome
from proxy.errors import NoHealthyInstance, UpstreamError, UpstreamStatus
from proxy.forward import StreamWatcher, copy
from proxy.names import model_key


async def passthrough(request: web.Request, body: bytes | None = None) -> web.StreamResponse:
    """Send the request as is to one routable instance (the next one if it cannot be reached)."""
    proxy = request.app[PROXY]
    if body is None:
        body = await request_body(request)
    with accounted(proxy, begin(proxy, request, body_model(body), reason="passthrough")) as access:
        return await _pass(proxy, request, body, access)


async def _pass(
    proxy: Proxy, request: web.Request, body: bytes, access: Access
) -> web.StreamResponse:
    router = proxy.router
    targets = router.routable()[: proxy.config.routing.attempts]
    if not targets:
        raise NoHealthyInstance()
    last: UpstreamError | None = None
    for inst in targets:
        access.instance = inst.name
        exchange = proxy.exchange(inst)
        with router.watching(inst, exchange):
            try:
                resp = await exchange.open(
                    request.method, request.path_qs, request.headers, body, first=None, idle=None
                )
            except UpstreamError as exc:
                router.report(inst, Outcome(exc.kind))
                count_failure(proxy, inst, exc)
                last = exc
                continue
            try:
                watcher = StreamWatcher()
                out, broken = await copy(request, exchange, resp, watcher, lambda: None)
            finally:
                exchange.close()
        access.status = out.status
        if watcher.client_gone:
            went_away(access)
        elif broken is not None:
            router.report(inst, Outcome.MIDSTREAM)
            count_failure(proxy, inst, broken, kind="midstream")
            access.error = f"{inst.name} {broken.message}"
        else:
            router.report(inst, Outcome.OK)
        return out
    assert last is not None
    return given_up(request, access, last)


def given_up(request: web.Request, access: Access, failure: UpstreamError) -> web.Response:
    """The answer when every try failed: the last instance's own 5xx, else a 502 naming it."""
    access.error = f"{failure.instance} {failure.message}"
    if isinstance(failure, UpstreamStatus):
        access.status = failure.status
        return web.Response(status=failure.status, body=failure.body, headers=failure.headers)
    access.status = 502
    return error_response(request.path, 502, f"no instance could answer: {access.error}")


async def unload_everywhere(
    request: web.Request, body: bytes, model: str, access: Access
) -> web.StreamResponse:
    """keep_alive 0 with an empty prompt unloads the model on every instance that has it."""
    proxy = request.app[PROXY]
    router = proxy.router
    key = model_key(model)
    holders = [i for i in router.routable() if key in i.loaded] or router.routable()[:1]
    access.reason = "unload"
    if not holders:
        raise NoHealthyInstance()
    access.instance = holders[0].name if len(holders) == 1 else "all"
    headers = {"Content-Type": "application/json"}
    first = proxy.config.timeouts.load

    async def one(inst: InstanceState) -> tuple[int, bytes]:
        exchange = proxy.exchange(inst)
        try:
            resp = await exchange.open("POST", request.path, headers, body, first=first, idle=first)
            return resp.status, await resp.read()
        except UpstreamStatus as exc:
            return exc.status, exc.body
        finally:
            exchange.close()

    results = await asyncio.gather(*(one(i) for i in holders), return_exceptions=True)
    answered = []
    for inst, result in zip(holders, results, strict=True):
        if isinstance(result, tuple):
            answered.append(result)
            if result[0] < 300:
                router.unloaded(inst, key)
        elif isinstance(result, UpstreamError):
            count_failure(proxy, inst, result)
        elif isinstance(result, BaseException):
            raise result
    if not answered:
        access.status = 502
        return error_response(request.path, 502, "no instance answered the unload")
    status, payload = answered[0]
    access.status = status
    return web.Response(
        status=status, body=payload, content_type="application/json", charset="utf-8"
    )
