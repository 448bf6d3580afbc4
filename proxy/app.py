"""Builds the proxy's aiohttp Application: config, instances, router, metrics and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.api import admin, ollama, openai, relay
from proxy.api import instances as instances_api
from proxy.api.context import PROXY, Proxy
from proxy.api.http import errors_middleware
from proxy.balancer.monitor import Monitor
from proxy.balancer.policies import make_policy
from proxy.balancer.queue import Dispatcher
from proxy.balancer.state import InstanceState, ModelBook
from proxy.config import Config, emulated_gpus, parse_listen
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.gpu import GpuSource
from proxy.gpu.http import HttpGpuSource
from proxy.gpu.nvml import local_gpu_source
from proxy.metrics import LiveCollector, Metrics, model_label

log = logging.getLogger("ollamux.proxy")


def instance_states(config: Config) -> list[InstanceState]:
    """The router's view of each configured instance (URL, GPUs, slots), all down until probed."""
    if config.instances == "auto":
        raise ConfigError(
            "instances: auto needs NVML GPU discovery, which comes with the process launcher; "
            "list the instances, or try config/demo.yaml",
            source=config.source,
            path="instances",
        )
    states = []
    emulated_index = {g.uuid: str(i) for i, g in enumerate(config.emulator.gpus)}
    for inst in config.instances:
        labels: dict[str, str] = {}
        if inst.launcher == "emulated":
            gpus = tuple(g.uuid for g in emulated_gpus(config, inst))
            labels = {uuid: emulated_index[uuid] for uuid in gpus if uuid in emulated_index}
        else:
            gpus = tuple(str(ref) for ref in inst.gpu)
        url = inst.url.rstrip("/") if inst.url else f"http://127.0.0.1:{inst.port}"
        states.append(
            InstanceState(
                name=inst.name,
                url=url,
                slots=inst.num_parallel,
                gpu_uuids=gpus,
                gpu_labels=labels,
            )
        )
    return states


def build_app(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    launcher: instances_api.InstanceLauncher | None = None,
) -> web.Application:
    """The proxy in front of ``config.instances``; the monitor starts with the app."""
    registry = registry if registry is not None else CollectorRegistry()
    instances = instance_states(config)
    book = ModelBook()
    metrics = Metrics(registry, config.routing.policy)
    dispatcher = Dispatcher(
        instances, make_policy(config.routing), book, config.queue, on_decision=metrics.decision
    )
    registry.register(LiveCollector(dispatcher, book))
    proxy = Proxy(
        config=config,
        instances=instances,
        book=book,
        dispatcher=dispatcher,
        metrics=metrics,
        model_label=model_label(book),
    )
    app = web.Application(middlewares=[errors_middleware], client_max_size=1 << 30)
    app[PROXY] = proxy
    app.add_routes(ollama.routes() + openai.routes() + admin.routes(registry))
    instances_api.install(app, launcher)  # /proxy/instances: list, drain, undrain, restart
    app.router.add_route("*", "/{tail:.*}", _anything_else)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session and the monitor; the first health round runs before serving."""
    proxy = app[PROXY]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    proxy.session = session
    proxy.forwarder = Forwarder(
        session,
        connect_timeout=proxy.config.timeouts.connect,
        first_byte_timeout=proxy.config.timeouts.first_byte,
    )
    sources: dict[str, GpuSource] = {}
    on_host = {"process", "systemd"} & set(_configured(proxy.config))
    local = await local_gpu_source() if on_host else None  # NVML, where it works
    for inst_config, inst in zip(_configured(proxy.config), proxy.instances, strict=True):
        if inst_config == "emulated":
            sources[inst.name] = HttpGpuSource(session, inst.url + "/gpus")
        elif inst_config in on_host and local is not None:
            sources[inst.name] = local
    monitor = Monitor(
        proxy.instances,
        proxy.book,
        session,
        proxy.config.timeouts,
        sources,
        on_change=proxy.dispatcher.pump,
    )
    proxy.monitor = monitor
    await monitor.check_all()
    task = asyncio.get_running_loop().create_task(monitor.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await session.close()


def _configured(config: Config) -> list[str]:
    return [] if config.instances == "auto" else [i.launcher for i in config.instances]


async def _anything_else(request: web.Request) -> web.StreamResponse:
    """Paths the proxy has no rule for: a body naming a model is routed, the rest goes as is."""
    if request.method == "POST":
        return await relay.handle(request)
    return await relay.passthrough(request)


async def serve_proxy(app: web.Application, listen: str) -> None:
    """Serve ``app`` on ``listen`` until cancelled (client disconnects cancel their handlers)."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("ollamux proxy listening on http://%s:%d", host, port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
