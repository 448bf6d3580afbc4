"""Blob uploads (``POST /api/blobs/{digest}``): streamed to one instance as they arrive.

Ollama takes blobs of many GB (``ollama create`` uploads a model's GGUF this way), so the body is
never held in the proxy and ``limits.max_body`` does not apply: it goes to the first routable
instance chunk by chunk, at the pace that instance reads it. Instances launched on one box share
their model store, so a blob pushed to one is seen by all (ARCHITECTURE.md). If an instance cannot
be reached before any of the body was read, the next routable one is tried; once part of the body
has gone, a failure is final (502), as the client cannot be asked to send it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from proxy.api.access import Access, accounted, begin, count_failure
from proxy.api.body import stalled
from proxy.api.context import PROXY, Proxy
from proxy.api.error_replies import error_response
from proxy.balancer.state import InstanceState, Outcome
from proxy.errors import (
    BodyIncomplete,
    NoHealthyInstance,
    RequestRefused,
    UpstreamError,
    UpstreamStatus,
)

_FORWARDED = ("Content-Type", "User-Agent", "Authorization")
"""Client headers an upload keeps; the proxy sets Host and the transfer coding itself."""


class _Body:
    """The client's body as an async iterator that knows whether any of it was sent upstream."""

    def __init__(self, content: aiohttp.StreamReader, idle: float) -> None:
        self._content = content
        self._idle = idle
        self.started = False
        self.broken: RequestRefused | None = None
        """Why the client's side failed: its body stalled, or ended before it was whole."""

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        while True:
            try:
                chunk = await asyncio.wait_for(self._content.readany(), self._idle)
            except asyncio.TimeoutError:
                self.broken = stalled(self._idle)
                raise self.broken from None
            except RequestPayloadError:
                self.broken = BodyIncomplete("the request body ended before it was complete")
                raise self.broken from None
            if not chunk:
                return
            yield chunk


async def upload(request: web.Request) -> web.StreamResponse:
    """Stream the body to one routable instance and answer what it answers (201, 200 or 400)."""
    proxy = request.app[PROXY]
    with accounted(proxy, begin(proxy, request, "", reason="blob")) as access:
        targets = proxy.router.routable()[: proxy.config.routing.attempts]
        if not targets:
            raise NoHealthyInstance()
        body = _Body(request.content, proxy.config.limits.client_idle)
        failure: UpstreamError | None = None
        for inst in targets:
            access.instance = inst.name
            try:
                status, payload, content_type = await _send(proxy, inst, request, body)
            except RequestRefused as exc:  # the client's body failed: not the instance's fault
                access.status, access.error = exc.status, exc.message
                raise
            except UpstreamError as exc:
                proxy.router.report(inst, Outcome(exc.kind))
                count_failure(proxy, inst, exc)
                failure = exc
                if body.started:
                    break  # part of the body went to this instance: it cannot be sent again
                continue
            proxy.router.report(inst, Outcome.STATUS if status >= 500 else Outcome.OK)
            access.status = status
            return web.Response(status=status, body=payload, headers=_content_type(content_type))
        assert failure is not None
        return _bad_gateway(request, access, failure)


async def _send(
    proxy: Proxy, inst: InstanceState, request: web.Request, body: _Body
) -> tuple[int, bytes, str]:
    """POST the body to ``inst`` through the forwarding seam; the client's own RequestRefused
    when it was reading the client's body that failed. Only connecting is bounded: sending many
    GB takes as long as it takes, and an instance answers as soon as the body is all in."""
    headers = CIMultiDict((k, v) for k in _FORWARDED if (v := request.headers.get(k)) is not None)
    exchange = proxy.exchange(inst)
    try:
        with proxy.router.watching(inst, exchange):
            resp = await exchange.open(
                "POST", request.path_qs, headers, body.chunks(), first=None, idle=None
            )
            payload = b"".join([chunk async for chunk in exchange.chunks(resp)])
            return resp.status, payload, resp.headers.get("Content-Type", "")
    except UpstreamStatus as exc:
        return exc.status, exc.body, exc.headers.get("Content-Type", "")
    except UpstreamError:
        if body.broken is not None:
            raise body.broken from None
        raise
    finally:
        exchange.close()


def _content_type(value: str) -> dict[str, str]:
    return {"Content-Type": value} if value else {}


def _bad_gateway(request: web.Request, access: Access, failure: UpstreamError) -> web.Response:
    access.status, access.error = 502, failure.message
    return error_response(
        request.path, 502, f"the blob upload to instance {failure.instance} failed"
    )
