"""Requests the router does not place: sent as they came to one instance, or to all holders.

A passthrough goes to the first routable instance and, if it cannot be reached, to the next (up
to ``routing.attempts``), so the client gets Ollama's own answer byte for byte. An unload
(``keep_alive: 0`` with an empty prompt) goes to every instance that has the model loaded, since
the client sees one Ollama.
"""

from __future__ import annotations

import asyncio
import json

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
    model = body_model(body) or request.match_info.get("model", "")  # /v1/models/{model}
    with accounted(proxy, begin(proxy, request, model, reason="passthrough")) as access:
        return await _pass(proxy, request, body, access)


async def _pass(
    proxy: Proxy, request: web.Request, body: bytes, access: Access
) -> web.StreamResponse:
    router = proxy.router
    targets = _targets(proxy, access.model)
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


Answer = tuple[int, bytes, str]
"""An instance's status, body and content type."""


def _targets(proxy: Proxy, model: str) -> list[InstanceState]:
    """Where to send a request as is: routable instances that hold the model it names first
    (``/api/show`` of a model only one store has goes there), the others after them."""
    routable = proxy.router.routable()
    if model:
        holders = proxy.router.holders(model, known=True)
        routable.sort(key=lambda i: i not in holders)  # stable: configured order within each
    return routable[: proxy.config.routing.attempts]


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
    holders = [i for i in router.routable() if key in i.loaded] or _targets(proxy, model)[:1]
    access.reason = "unload"
    answers = await _each(request, body, holders, access)
    for inst, (status, _payload, _type) in answers:
        if status < 300:
            router.unloaded(inst, key)
    return _first_success(request, access, answers)


async def to_every_store(request: web.Request) -> web.StreamResponse:
    """``/api/delete`` and ``/api/copy``: once in every store that holds the model it names
    (one instance per store); the client gets a success if any store did it."""
    proxy = request.app[PROXY]
    body = await request_body(request)
    model = _store_model(body)
    stores: dict[str, InstanceState] = {}
    for inst in proxy.router.holders(model, known=True) if model else ():
        if inst.routable:
            stores.setdefault(inst.store, inst)
    if not stores:  # nobody has it (or the body is not what Ollama takes): Ollama answers
        return await passthrough(request, body)
    with accounted(proxy, begin(proxy, request, model, reason="every_store")) as access:
        answers = await _each(request, body, list(stores.values()), access)
        if proxy.monitor is not None:
            touched = [i for i in proxy.instances if i.store in stores]
            await proxy.monitor.refresh_tags(touched)
        return _first_success(request, access, answers)


def _store_model(body: bytes) -> str:
    """The model a store change concerns: ``model``/``name``, or a copy's ``source``."""
    model = body_model(body)
    if model or not body.lstrip().startswith(b"{"):
        return model
    try:
        source = json.loads(body).get("source")
    except (ValueError, AttributeError):
        return ""
    return source if isinstance(source, str) else ""


async def _each(
    request: web.Request, body: bytes, targets: list[InstanceState], access: Access
) -> list[tuple[InstanceState, Answer]]:
    """Send the request to every target at once; the answers of those that answered."""
    proxy = request.app[PROXY]
    if not targets:
        raise NoHealthyInstance()
    access.instance = targets[0].name if len(targets) == 1 else "all"
    headers = {"Content-Type": "application/json"}
    deadline = proxy.config.timeouts.load

    async def one(inst: InstanceState) -> Answer:
        exchange = proxy.exchange(inst)
        try:
            resp = await exchange.open(
                request.method, request.path, headers, body, first=deadline, idle=deadline
            )
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "")
        except UpstreamStatus as exc:
            return exc.status, exc.body, exc.headers.get("Content-Type", "")
        finally:
            exchange.close()

    results = await asyncio.gather(*(one(i) for i in targets), return_exceptions=True)
    answers = []
    for inst, result in zip(targets, results, strict=True):
        if isinstance(result, tuple):
            answers.append((inst, result))
        elif isinstance(result, UpstreamError):
            count_failure(proxy, inst, result)
        elif isinstance(result, BaseException):
            raise result
    return answers


def _first_success(
    request: web.Request, access: Access, answers: list[tuple[InstanceState, Answer]]
) -> web.Response:
    """One answer for the client: the first success, else the first instance's own answer."""
    if not answers:
        access.status = 502
        return error_response(request.path, 502, "no instance answered")
    ordered = sorted((answer for _inst, answer in answers), key=lambda a: a[0] >= 300)
    status, payload, content_type = ordered[0]
    access.status = status
    headers = {"Content-Type": content_type} if content_type else {}
    return web.Response(status=status, body=payload or None, headers=headers)
