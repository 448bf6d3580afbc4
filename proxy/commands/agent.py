"""`ollamux agent`: this host's GPU memory over HTTP, for a proxy on another host to read.

The agent answers ``GET /gpus`` with ``{"gpus": [...]}`` in exactly the shape of the emulator's
``GET /gpus`` (the keys of :class:`~proxy.gpu.GpuReading`): each physical GPU and each MIG device
under its own UUID, as :class:`~proxy.gpu.nvml.NvmlGpuSource` reads them for local instances. A
proxy reads it with :class:`~proxy.gpu.remote.HttpGpuSource`. Readings are at most
:data:`CACHE_SECONDS` old, so a busy proxy does not call NVML on every poll.

An agent without GPUs is of no use, so it refuses to start (exit 1, one sentence) when NVML cannot
read any; a read that fails later answers 503 with ``{"error": ...}``. With a token, ``/gpus`` asks
for ``Authorization: Bearer TOKEN`` (401 otherwise); ``GET /`` always says the agent is running.

aiohttp's server, the config and NVML's module are imported on use: every command's parser is built
from this module, and ``ollamux --version`` should not pay for them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import logging
import os
import time
from typing import TYPE_CHECKING

from proxy.cli_help import Subparsers
from proxy.errors import ConfigError, GpuUnavailable, LaunchError

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.gpu import GpuReading, GpuSource

__all__ = [
    "CACHE_SECONDS",
    "DEFAULT_LISTEN",
    "NAME",
    "TOKEN_ENV",
    "build_agent_app",
    "open_nvml",
    "register",
    "run",
    "run_agent",
    "serve_agent",
]

log = logging.getLogger("ollamux.agent")

NAME = "agent"
DEFAULT_LISTEN = "127.0.0.1:11433"
TOKEN_ENV = "OLLAMUX_AGENT_TOKEN"
CACHE_SECONDS = 0.5
RUNNING = "ollamux agent is running"


class _Readings:
    """The source's last readings, read again once they are :data:`CACHE_SECONDS` old."""

    def __init__(self, source: GpuSource) -> None:
        self._source = source
        self._lock = asyncio.Lock()  # concurrent requests share one NVML read
        self._at = -CACHE_SECONDS
        self._last: list[GpuReading] = []

    async def get(self) -> list[GpuReading]:
        async with self._lock:
            if time.monotonic() - self._at >= CACHE_SECONDS:
                self._last = await self._source.read()
                self._at = time.monotonic()
            return self._last


def register(commands: Subparsers) -> None:
    """``agent [--listen HOST:PORT] [--token TOKEN]``."""
    agent = commands.add_parser(
        NAME,
        help="serve this host's GPU memory (NVML) as GET /gpus for a proxy on another host",
        description="Serve this host's NVIDIA GPUs, read with NVML, as GET /gpus in the shape "
        "the proxy reads (an external instance's gpu_source: http://HOST:11433), until Ctrl-C "
        "or SIGTERM. Exits 1 when NVML reads no GPU.",
    )
    agent.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="default: 127.0.0.1:11433; use 0.0.0.0:11433 to let a proxy on another host read it",
    )
    agent.add_argument(
        "--token",
        default="",
        help="require Authorization: Bearer TOKEN on /gpus (default: $OLLAMUX_AGENT_TOKEN; "
        "the variable keeps it out of the process list)",
    )


def run(args: argparse.Namespace) -> None:
    run_agent(args.listen, token=args.token or os.environ.get(TOKEN_ENV, ""))


def run_agent(listen: str | None, *, token: str = "") -> None:
    """Serve this host's GPUs on ``listen`` until SIGINT or SIGTERM.

    Raises ConfigError for a bad ``--listen``, GpuUnavailable when NVML reads no GPU, LaunchError
    when the address cannot be listened on.
    """
    from proxy.config import parse_listen

    try:
        host, port = parse_listen(listen or DEFAULT_LISTEN)
    except ValueError as exc:
        raise ConfigError(str(exc), path="--listen") from None
    asyncio.run(serve_agent(host, port, token=token))


async def open_nvml() -> GpuSource:
    """The NVML source, or GpuUnavailable saying why there is none (no library, driver or GPU)."""
    from proxy.gpu.nvml import discover, local_gpu_source

    await asyncio.to_thread(discover, processes=False)  # raises with one sentence and a fix
    source = await local_gpu_source()
    if source is None:  # NVML answered a moment ago; the warning logged says why it stopped
        raise GpuUnavailable("NVML stopped answering while the agent started; check `nvidia-smi`")
    return source


async def serve_agent(
    host: str,
    port: int,
    *,
    token: str = "",
    source: GpuSource | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (by default: until SIGINT or SIGTERM), then close.

    ``source`` defaults to NVML (:func:`open_nvml`); tests pass their own ``stop``.
    """
    from aiohttp import web

    source = source or await open_nvml()
    try:
        first = await source.read()  # the GPUs the start-up line names
    except OSError as exc:
        raise GpuUnavailable(f"cannot read the GPUs ({exc}); check `nvidia-smi`") from None
    if stop is None:
        from proxy.instances.supervisor import stop_on_signals

        stop = asyncio.Event()
        stop_on_signals(stop)  # the handlers only set the event
    runner = web.AppRunner(build_agent_app(source, token=token), shutdown_timeout=1.0)
    await runner.setup()
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise LaunchError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        gpus = ", ".join(f"{r.index} {r.name} ({r.uuid})" for r in first)
        log.info(
            "ollamux agent serving %d GPU reading(s) on http://%s/gpus (%s): %s",
            len(first),
            where,
            "bearer token required" if token else "no token",
            gpus,
        )
        await stop.wait()
    finally:
        await runner.cleanup()
    log.info("ollamux agent on %s stopped", where)


def build_agent_app(source: GpuSource, *, token: str = "") -> web.Application:
    """``GET /gpus`` (behind ``token`` when given) and ``GET /``."""
    from aiohttp import web

    readings = _Readings(source)

    async def gpus(request: web.Request) -> web.Response:
        return await _gpus(request, readings, token)

    app = web.Application()
    app.add_routes([web.get("/gpus", gpus), web.get("/", _root)])
    return app


async def _root(request: web.Request) -> web.Response:
    from aiohttp import web

    return web.Response(text=RUNNING)


async def _gpus(request: web.Request, readings: _Readings, token: str) -> web.Response:
    from aiohttp import web

    if token and not _authorized(request.headers.get("Authorization", ""), token):
        return web.json_response(
            {
                "error": "missing or wrong token; send Authorization: Bearer TOKEN (the agent's "
                f"--token or ${TOKEN_ENV})"
            },
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        found = await readings.get()
    except OSError as exc:
        log.warning("cannot read the GPUs: %s", exc)
        return web.json_response(
            {"error": f"the agent cannot read the GPUs ({exc}); check `nvidia-smi` on this host"},
            status=503,
        )
    return web.json_response({"gpus": [dataclasses.asdict(r) for r in found]})


def _authorized(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
