"""The emulated Ollama's aiohttp application: routes, Ollama's front-door checks, serving.

Middlewares, outermost first, in Ollama's order (shared/reference/ollama.md §1): CORS (an unlisted
``Origin`` is a 403 with an empty body, an allowed preflight a 204), the Host check of a
loopback-bound server (a foreign ``Host`` is a 403), then the translation of errors: gin's
text/plain ``404 page not found`` and ``405 method not allowed``, and EmulatorError as the native
``{"error"}`` or, under /v1, the OpenAI error object.

Two routes exist only on the emulator: ``GET /gpus`` (the GPU source the proxy reads, in the same
shape as NVML's) and ``GET|POST /emulator/faults`` (read or set the fault knobs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import log as aiohttp_log
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.emulator import manage, native, openai
from proxy.emulator.catalogue import Catalogue
from proxy.emulator.common import STATE, EmulatorState, error_response, json_response
from proxy.emulator.engine import Engine
from proxy.emulator.events import Faults
from proxy.emulator.store import ModelStore
from proxy.errors import BadRequest, EmulatorError

__all__ = ["build_emulator_app", "run_emulator"]

DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for port in ("", ":*")
        for scheme in ("http", "https")
    ),
    *("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"),
)
"""Origins Ollama always allows (envconfig.AllowedOrigins), before OLLAMA_ORIGINS."""
_EXTENSIONS = (
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)
_ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "User-Agent",
    "Accept",
    "X-Requested-With",
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-Os",
    "X-Stainless-Arch",
    "X-Stainless-Retry-Count",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Async",
    "X-Stainless-Helper-Method",
    "X-Stainless-Poll-Helper",
    "X-Stainless-Custom-Poll-Interval",
    "X-Stainless-Timeout",
    "OpenAI-Beta",
)
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
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
    allowed = _Origins((*DEFAULT_ORIGINS, *engine.settings.origins, *origins))
    app = web.Application(
        middlewares=[_cors(allowed), _hosts(bind_host), _errors], client_max_size=MAX_BODY
    )
    app[STATE] = EmulatorState(engine=engine, store=store, catalogue=catalogue, version=version)
    app.add_routes(native.routes())
    app.add_routes(manage.routes())
    app.add_routes(openai.routes())
    app.add_routes(
        [
            web.get("/gpus", _gpus, allow_head=False),
            web.get("/emulator/faults", _faults, allow_head=False),
            web.post("/emulator/faults", _faults),
        ]
    )

    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin", "")
        if _is_cross_origin(request, origin) and allowed.match(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if allowed.any else origin
            if not allowed.any:
                response.headers.add("Vary", "Origin")

    app.on_response_prepare.append(add_cors_headers)
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
        access_log=aiohttp_log.access_logger if access_log else None,
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


# --- the front door --------------------------------------------------------------------------


class _Origins:
    """gin-contrib/cors origin rules: exact, one ``*`` wildcard each, or ``*`` for all."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.exact = {o for o in origins if "*" not in o}
        self.wildcards = [tuple(o.split("*", 1)) for o in origins if "*" in o and o != "*"]

    def match(self, origin: str) -> bool:
        if self.any or origin in self.exact or origin.startswith(_EXTENSIONS):
            return True
        return any(
            origin.startswith(pre) and origin.endswith(post) and len(origin) >= len(pre) + len(post)
            for pre, post in self.wildcards
        )


def _is_cross_origin(request: web.Request, origin: str) -> bool:
    host = request.headers.get("Host", "")
    return bool(origin) and origin not in (f"http://{host}", f"https://{host}")


def _cors(allowed: _Origins) -> Middleware:
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if not _is_cross_origin(request, origin):
            return await handler(request)
        if not allowed.match(origin):
            return web.Response(status=403)
        if request.method == "OPTIONS":
            headers = {
                "Access-Control-Allow-Origin": "*" if allowed.any else origin,
                "Access-Control-Allow-Methods": "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS",
                "Access-Control-Allow-Headers": ",".join(_ALLOW_HEADERS),
                "Access-Control-Max-Age": "43200",
            }
            return web.Response(status=204, headers=headers)
        return await handler(request)

    return cors


def _hosts(bind_host: str) -> Middleware:
    loopback = _is_loopback(bind_host)
    hostname = socket.gethostname().lower()

    @web.middleware
    async def hosts(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not loopback:
            return await handler(request)
        host = _split_host(request.headers.get("Host", ""))
        address = _ip(host)
        if address is not None and (
            address.is_loopback or address.is_unspecified or any(address in n for n in _PRIVATE)
        ):
            return await handler(request)
        if _allowed_name(host.lower(), hostname):
            if request.method == "OPTIONS":
                return web.Response(status=204)
            return await handler(request)
        return web.Response(status=403)

    return hosts


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
            return openai.error_response(exc)
        return error_response(exc.status, exc.message)
    except ConnectionResetError:  # the client left while we wrote: like Ollama, say nothing
        raise asyncio.CancelledError from None


def _is_loopback(bind_host: str) -> bool:
    if bind_host.lower() == "localhost":
        return True
    address = _ip(bind_host)
    return address is not None and address.is_loopback


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split_host(host: str) -> str:
    """Go's net.SplitHostPort, falling back to the whole value when there is no port."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0 and host[end + 1 :].startswith(":"):
            return host[1:end]
        return host
    if host.count(":") == 1:
        return host.rpartition(":")[0]
    return host


def _allowed_name(host: str, hostname: str) -> bool:
    if host in ("", "localhost", hostname):
        return True
    return host.endswith((".localhost", ".local", ".internal"))
