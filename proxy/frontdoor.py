"""Ollama's front door, shared by the emulator and the proxy's edge: allowed Hosts, Origins, CORS.

The rules are Ollama's (shared/reference/ollama.md §1), in its order: first CORS, then the Host
check of a loopback-bound server.

- **CORS**: a request whose ``Origin`` is neither the server itself (``http(s)://<Host>``) nor an
  allowed origin gets 403 with an empty body. Allowed: :data:`DEFAULT_ORIGINS`, browser extensions,
  and the extra origins (``OLLAMA_ORIGINS``; entries may hold one ``*`` wildcard, ``*`` alone allows
  all). A preflight (``OPTIONS``) from an allowed origin is answered 204 with the allow headers, on
  every path; other answers to an allowed origin carry ``Access-Control-Allow-Origin``.
- **Host** (only when bound to a loopback address): the ``Host`` header, its port ignored, must be
  empty, ``localhost``, this machine's hostname, a name under ``.localhost``, ``.local`` or
  ``.internal``, or an IP literal that is loopback, private, unspecified or one of this machine's
  interface addresses; anything else gets 403 with an empty body (DNS rebinding). ``OPTIONS`` to an
  allowed name is answered 204 at once.

aiohttp is imported only where the middleware is built, so the config loader can check origins
without loading the HTTP stack.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.errors import ConfigError

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware

__all__ = [
    "ALLOW_HEADERS",
    "DEFAULT_ORIGINS",
    "Origins",
    "cors_headers",
    "front_door",
    "is_loopback",
    "origin_problem",
    "parse_origins",
]

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
EXTENSIONS = (
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)
"""Browser-extension origins, all allowed (Ollama turns on AllowBrowserExtensions)."""
ALLOW_HEADERS = (
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
ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
MAX_AGE = "43200"
_SCHEMES = ("http://", "https://", *EXTENSIONS)
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_LOCAL_NAMES = (".localhost", ".local", ".internal")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- origins ---------------------------------------------------------------------------------


class Origins:
    """The allowed origins: exact, one ``*`` wildcard each, or ``*`` for all (gin-contrib/cors)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        normal = tuple(o.strip().lower() for o in origins if o.strip())
        self.any = "*" in normal
        self.exact = {o for o in normal if "*" not in o}
        self.wildcards = [tuple(o.split("*", 1)) for o in normal if "*" in o and o != "*"]

    def match(self, origin: str) -> bool:
        if self.any or origin in self.exact or origin.startswith(EXTENSIONS):
            return True
        return any(
            origin.startswith(pre) and origin.endswith(post) and len(origin) >= len(pre) + len(post)
            for pre, post in self.wildcards
        )


def parse_origins(value: str) -> tuple[str, ...]:
    """``OLLAMA_ORIGINS`` as Ollama reads it: quotes around the whole value dropped, then a comma
    list whose entries are trimmed (empty ones are skipped)."""
    value = value.strip().strip("\"'")
    return tuple(o.strip() for o in value.split(",") if o.strip())


def origin_problem(origin: str) -> str | None:
    """Why Ollama would refuse to start with ``origin`` in its list, or None when it is fine."""
    if origin.count("*") > 1:
        return f"{origin!r} has more than one '*'; use one wildcard per entry"
    if "*" not in origin and not origin.strip().lower().startswith(_SCHEMES):
        return (
            f"{origin!r} is not an origin; write scheme://host[:port], e.g. "
            "https://webui.example.com, or use one '*' wildcard, e.g. http://10.0.0.*"
        )
    return None


def env_origins(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The entries of ``OLLAMA_ORIGINS`` in ``environ``; a ConfigError naming the variable for an
    entry Ollama itself would refuse to start with."""
    origins = parse_origins(environ.get("OLLAMA_ORIGINS", ""))
    for origin in origins:
        problem = origin_problem(origin)
        if problem is not None:
            raise ConfigError(problem, source="environment", path="OLLAMA_ORIGINS")
    return origins


def _is_cross_origin(host: str, origin: str) -> bool:
    return bool(origin) and origin not in (f"http://{host}", f"https://{host}")


# --- hosts -----------------------------------------------------------------------------------


def is_loopback(bind_host: str) -> bool:
    """Whether a server bound to ``bind_host`` is reachable from this machine only."""
    if bind_host.lower() == "localhost":
        return True
    address = _ip(bind_host)
    return address is not None and address.is_loopback


def _host_allowed(host_header: str, hostname: str) -> tuple[bool, bool]:
    """(allowed, by name): a name-admitted host answers ``OPTIONS`` itself, as Ollama does."""
    host = _split_host(host_header)
    address = _ip(host)
    if address is not None and (
        address.is_loopback
        or address.is_unspecified
        or any(address in n for n in _PRIVATE)
        or address in _local_addresses()
    ):
        return True, False
    host = host.lower()
    if host in ("", "localhost", hostname) or host.endswith(_LOCAL_NAMES):
        return True, True
    return False, False


def _ip(text: str) -> IPAddress | None:
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


def _local_addresses() -> set[IPAddress]:
    """This machine's interface addresses (Linux /proc; empty elsewhere), read when asked, as
    Ollama lists the interfaces for each such request."""
    found: set[IPAddress] = set()
    try:
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif text == "/32 host LOCAL" and last:
                found.add(ipaddress.IPv4Address(last))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            digits = line.split()[0]
            found.add(ipaddress.IPv6Address(int(digits, 16)))
    except (OSError, ValueError, IndexError):
        pass
    return found


# --- the middleware --------------------------------------------------------------------------


def front_door(allowed: Origins, bind_host: str) -> Middleware:
    """The CORS check, then (on a loopback bind) the Host check: one middleware, Ollama's order."""
    from aiohttp import web

    loopback = is_loopback(bind_host)
    hostname = socket.gethostname().lower()

    @web.middleware
    async def front_door(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if _is_cross_origin(request.headers.get("Host", ""), origin):
            if not allowed.match(origin):
                return web.Response(status=403)
            if request.method == "OPTIONS":
                headers = {
                    "Access-Control-Allow-Origin": "*" if allowed.any else origin,
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ",".join(ALLOW_HEADERS),
                    "Access-Control-Max-Age": MAX_AGE,
                }
                return web.Response(status=204, headers=headers)
        if not loopback:
            return await handler(request)
        ok, by_name = _host_allowed(request.headers.get("Host", ""), hostname)
        if not ok:
            return web.Response(status=403)
        if by_name and request.method == "OPTIONS":
            return web.Response(status=204)
        return await handler(request)

    return front_door


def cors_headers(
    allowed: Origins,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` hook: every answer to an allowed cross-origin request, streams
    and errors included, carries ``Access-Control-Allow-Origin``."""

    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin", "")
        if _is_cross_origin(request.headers.get("Host", ""), origin) and allowed.match(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if allowed.any else origin
            if not allowed.any:
                response.headers.add("Vary", "Origin")

    return add_cors_headers
