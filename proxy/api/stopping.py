"""Graceful stop of the proxy's HTTP server: refuse new requests, drain those in flight, then cut.

`ollamux serve` on SIGTERM or Ctrl-C (see :func:`proxy.app.serve_proxy`):

1. the listening socket closes, so new connections are refused;
2. the :class:`Gate` closes: a request arriving on a connection that was already open gets 503 with
   ``Retry-After`` and ``Connection: close``, in Ollama's error shape (OpenAI's under ``/v1``);
   the health probes (:data:`PROBES`) still get their own answers: live 200, ready 503 "stopping";
3. requests in flight, streams included, run to their end, up to ``timeouts.drain``;
4. what is still running then (or at once on a second signal) is cut: its connection is closed.

Only after that does the caller stop the instances. The health monitor lives in the app's cleanup
context, which aiohttp runs after the server has stopped, so it keeps running while draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.api.error_replies import error_response

__all__ = [
    "FINAL_WRITES",
    "GATE",
    "PROBES",
    "RETRY_AFTER",
    "Gate",
    "cut_connections",
    "drain",
    "refuse",
]

log = logging.getLogger("ollamux.proxy")

RETRY_AFTER = 5
"""Seconds a client refused while stopping is told to wait (a restart usually takes that long)."""
FINAL_WRITES = 2.0
"""Grace aiohttp gives handlers that returned to finish writing, once nothing is in flight."""
STOPPING = "the proxy is stopping and takes no new requests; retry shortly"
PROBES = frozenset({"/proxy/live", "/proxy/ready"})
"""Health probes (api/health.py): answered while draining, and not counted as in flight."""


class Gate:
    """Counts the requests in flight; once closed, answers new ones 503 instead of handling them."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.refused = 0
        self.closed = False
        self.cutting = False
        """Set when the drain ends with requests still in flight: their connections close next
        (the relay may tell such a cut from a client that went away)."""
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost middleware: a request counts while its handler runs (a stream, to its end)."""
        if request.path in PROBES:
            return await handler(request)  # cheap, never awaits an instance: nothing to drain
        if self.closed:
            self.refused += 1
            return refuse(request)
        self.in_flight += 1
        self._idle.clear()
        try:
            response = await handler(request)
            if self.closed and not response.prepared:
                # Its head is still to be written: say "Connection: close" there. A stream's head
                # is out already; the next request on its connection gets the 503 instead.
                response.force_close()
            return response
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    def close(self) -> None:
        """From now on every new request gets 503."""
        self.closed = True

    async def idle(self) -> None:
        """Returns once no request is in flight."""
        await self._idle.wait()


GATE = web.AppKey("stopping_gate", Gate)
"""The app's gate, set by :func:`proxy.app.serve_proxy` (absent in apps served otherwise)."""


def refuse(request: web.Request) -> web.Response:
    """503 + Retry-After + Connection: close, with an error body the client's API understands."""
    response = error_response(
        request.path, 503, STOPPING, headers={"Retry-After": str(RETRY_AFTER)}
    )
    response.force_close()
    return response


async def drain(gate: Gate, deadline: float, cut: asyncio.Event) -> int:
    """Close ``gate`` and wait until nothing is in flight, ``deadline`` seconds pass or ``cut``.

    Returns how many requests were still in flight at the end (0: drained); logs the start and
    the end. Closing their connections is the caller's job (:func:`cut_connections`).
    """
    gate.close()
    if gate.in_flight:
        log.info(
            "stopping: new requests are refused; waiting for %d request(s) in flight "
            "(up to timeouts.drain = %g s; signal again to stop at once)",
            gate.in_flight,
            deadline,
        )
    else:
        log.info("stopping: new requests are refused; no request in flight")
    idle = asyncio.ensure_future(gate.idle())
    cutting = asyncio.ensure_future(cut.wait())
    try:
        await asyncio.wait({idle, cutting}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (idle, cutting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    left = gate.in_flight
    gate.cutting = bool(left)
    refused = f"; refused {gate.refused} new request(s) meanwhile" if gate.refused else ""
    if not left:
        log.info("drained: every request in flight finished%s", refused)
    elif cut.is_set():
        log.warning("stopping at once (second signal): cutting %d request(s)%s", left, refused)
    else:
        log.warning(
            "drain deadline (%g s) passed: cutting %d request(s) still in flight%s",
            deadline,
            left,
            refused,
        )
    return left


def cut_connections(server: web.Server | None) -> None:
    """Close every connection now; their handlers are cancelled (``handler_cancellation``)."""
    if server is None:
        return
    for connection in server.connections:
        connection.force_close()
