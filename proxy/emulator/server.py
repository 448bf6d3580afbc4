"""The emulated Ollama's aiohttp application: routes, Ollama's front-door checks, serving.

Middlewares, outermost first, in Ollama's order (shared/reference/ollama.md §1): the front door
(:mod:`proxy.frontdoor`, shared with the proxy's edge: CORS, then the Host check of a
loopback-bound server; refusals are 403 with an empty body), then the translation of errors: gin's
text/plain ``404 page not found`` and ``405 method not allowed``, and EmulatorError as the native
``{"error"}`` or, under /v1, the OpenAI error object.

Two routes exist only on the emulator: ``GET /gpus`` (the GPU source the proxy reads, in the same
shape as NVML's) and ``GET|POST /emulator/faults`` (read or set the fault knobs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.emulator import native_endpoints, openai_endpoints, store_endpoints
from proxy.emulator.catalogue import Catalogue
from proxy.emulator.common import STATE, EmulatorState, error_response, json_response
from proxy.emulator.engine import Engine
from proxy.emulator.events import Faults
from proxy.emulator.store import ModelStore
from proxy.errors import BadRequest, EmulatorError
from proxy.frontdoor import DEFAULT_ORIGINS, Origins, cors_headers, front_door
from proxy.logs import AccessLogger

__all__ = ["build_emulator_app", "run_emulator"]

MAX_BODY = 1 << 40
"""Ollama has no body-size limit on its native endpoints."""


def build_emulator_app(
    engine: Engine,
    store: ModelStore,
    catalogue: Catalogue,
    *,
    version: str,
    bind_host: str,
    origins: tuple[str, ...] = (),
) -> web.Application:
    """The emulated server; ``bind_host`` decides whether the loopback Host check applies."""
    allowed = Origins((*DEFAULT_ORIGINS, *engine.settings.origins, *origins))
    app = web.Application(
        middlewares=[front_door(allowed, bind_host), _errors], client_max_size=MAX_BODY
    )
    app[STATE] = EmulatorState(engine=engine, store=store, catalogue=catalogue, version=version)
    app.add_routes(native_endpoints.routes())
    app.add_routes(store_endpoints.routes())
    app.add_routes(openai_endpoints.routes())
    app.add_routes(
        [
            web.get("/gpus", _gpus, allow_head=False),
            web.get("/emulator/faults", _faults, allow_head=False),
            web.post("/emulator/faults", _faults),
        ]
    )

    app.on_response_prepare.append(cors_headers(allowed))
    app.cleanup_ctx.append(_lifecycle)
    return app


async def run_emulator(
    app: web.Application, host: str, port: int, *, access_log: bool = True
) -> None:
    """Serve ``app`` until cancelled, then close it, dropping open connections as Ollama does."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=0.5,
        access_log=logging.getLogger("ollamux.emulator.access") if access_log else None,
        access_log_class=AccessLogger,  # key=value lines, as the proxy's own access log
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.get_running_loop().create_future()  # never set: until cancelled
    finally:
        await runner.cleanup()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    yield
    state = app[STATE]
    await state.store.aclose()
    await state.engine.aclose()


# --- emulator-only routes --------------------------------------------------------------------


async def _gpus(request: web.Request) -> web.Response:
    gpus = [dataclasses.asdict(gpu) for gpu in request.app[STATE].engine.gpus()]
    return json_response({"gpus": gpus})


_FAULT_TYPES: dict[str, tuple[type, ...]] = {
    "fail_next": (int,),
    "hang": (bool,),
    "die_after_tokens": (int, type(None)),
    "slow": (int, float),
    "fail_message": (str,),
}


async def _faults(request: web.Request) -> web.Response:
    faults = request.app[STATE].engine.faults
    if request.method == "POST":
        changes = _fault_changes(await request.read())
        for name, value in changes.items():
            setattr(faults, name, float(value) if name == "slow" else value)
    return json_response(dataclasses.asdict(faults))


def _fault_changes(body: bytes) -> dict[str, Any]:
    try:
        changes = json.loads(body or b"{}")
    except ValueError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(changes, dict):
        raise BadRequest("expected a JSON object of fault settings")
    known = {f.name for f in dataclasses.fields(Faults)}
    for name, value in changes.items():
        if name not in known:
            raise BadRequest(f"unknown fault {name!r}; known: {', '.join(sorted(known))}")
        types = _FAULT_TYPES[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise BadRequest(f"fault {name!r} has the wrong type: {value!r}")
        if isinstance(value, (int, float)) and value < 0:
            raise BadRequest(f"fault {name!r} must be >= 0")
        if name == "slow" and value == 0:
            raise BadRequest("fault 'slow' must be > 0")
    return changes


# --- errors ----------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed:
        return web.Response(
            status=405, body=b"405 method not allowed", headers={"Content-Type": "text/plain"}
        )
    except web.HTTPNotFound:
        return web.Response(
            status=404, body=b"404 page not found", headers={"Content-Type": "text/plain"}
        )
    except EmulatorError as exc:
        if request.path.startswith("/v1/"):
            return openai_endpoints.error_response(exc)
        return error_response(exc.status, exc.message)
    except ConnectionResetError:  # the client left while we wrote: like Ollama, say nothing
        raise asyncio.CancelledError from None
