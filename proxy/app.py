"""Builds the proxy's aiohttp Application: config, instances, router, metrics and routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import splice
from proxy.api import (
    admin,
    auth,
    edge,
    instance_admin,
    ollama,
    openai_routes,
    preload,
    relay,
    stopping,
    ui,
)
from proxy.api.body import limit_middleware
from proxy.api.clients import raise_open_files_limit, runner_options
from proxy.api.context import PROXY, Proxy
from proxy.api.error_replies import errors_middleware
from proxy.api.passthrough import passthrough
from proxy.background import running
from proxy.balancer.monitor import Monitor
from proxy.balancer.policies import make_policy
from proxy.balancer.router import Router
from proxy.balancer.state import InstanceState, ModelBook
from proxy.config import GIB, Config, InstanceConfig, emulated_gpus, parse_listen
from proxy.errors import ConfigError
from proxy.gpu import GpuSource
from proxy.gpu.nvml import local_gpu_source
from proxy.gpu.remote import HttpGpuSource
from proxy.metrics import LiveCollector, Metrics, model_label

log = logging.getLogger("ollamux.proxy")


def instance_states(config: Config) -> list[InstanceState]:
    """The router's view of each configured instance (URL, GPUs, slots), all down until probed."""
    if config.instances == "auto":
        raise ConfigError(
            "instances: auto needs NVML GPU discovery, which comes with the process launcher; "
            "list the instances, or try the emulated demo box: ollamux demo",
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
                slots=inst.slots,
                slots_assumed=not inst.num_parallel and inst.launcher == "external",
                capacity={} if inst.launcher == "node" else None,
                api_key=inst.api_key,
                gpu_uuids=gpus,
                gpu_labels=labels,
                store=_store(config, inst),
                memory_source=_memory_source(inst),
                memory_capacity=int(inst.memory_gib * GIB),
            )
        )
    return states


def _store(config: Config, inst: InstanceConfig) -> str:
    """Which model store ``inst`` reads: the servers ollamux starts share ``models_dir`` (an
    emulated one without it keeps its store in memory); external ones have their own unless they
    name a shared ``store``."""
    if inst.launcher == "node":
        return f"node:{inst.name}"  # it pulls into its own stores itself
    if inst.launcher == "external":
        return f"store:{inst.store}" if inst.store else f"instance:{inst.name}"
    if inst.launcher == "emulated" and not config.models_dir:
        return f"instance:{inst.name}"
    return "local"


def _memory_source(inst: InstanceConfig) -> str:
    if inst.launcher == "node":
        return "node"  # it places models on its own GPUs
    if inst.launcher == "emulated":
        return "emulator"
    if inst.launcher != "external":
        return "nvml"
    if inst.gpu_source:
        return "agent"
    return "memory_gib" if inst.memory_gib else "learned"


def build_app(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    launcher: instance_admin.InstanceLauncher | None = None,
) -> web.Application:
    """The proxy in front of ``config.instances``; the monitor starts with the app."""
    registry = registry if registry is not None else CollectorRegistry()
    instances = instance_states(config)
    book = ModelBook()
    metrics = Metrics(registry, config.routing.policy, [inst.name for inst in instances])
    router = Router(
        instances, make_policy(config.routing), book, config, on_decision=metrics.decision
    )
    registry.register(LiveCollector(router.dispatcher, book))
    router.outliers.track(instances, metrics.ejections)
    proxy = Proxy(
        config=config,
        instances=instances,
        book=book,
        router=router,
        metrics=metrics,
        model_label=model_label(book),
    )
    router.preloader = partial(preload.load, proxy)  # replicas load in the background
    app = web.Application(
        middlewares=[errors_middleware, limit_middleware, auth.middleware],
        client_max_size=config.limits.max_body,
    )
    edge.install(app, config)  # outermost: Host/Origin checks and CORS, as Ollama does them
    app[PROXY] = proxy
    auth.install(app)  # API keys (auth.keys_file): read now, reloaded while serving
    app.add_routes(ollama.routes() + openai_routes.routes() + admin.routes(registry) + ui.routes())
    instance_admin.install(app, launcher)  # /proxy/instances: list, drain, undrain, restart
    app.router.add_route("*", "/{tail:.*}", _anything_else)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session and the monitor; the first health round runs before serving."""
    proxy = app[PROXY]
    connector = splice.connector(limit=0, limit_per_host=0, keepalive_timeout=30)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    proxy.session = session
    try:  # the session closes whatever fails from here on (NVML, the first health round)
        monitor = Monitor(
            proxy.instances,
            proxy.book,
            session,
            proxy.config.timeouts,
            await _gpu_sources(proxy, session),
            outliers=proxy.router.outliers,
            on_change=proxy.router.dispatcher.pump,
            on_down=proxy.router.went_down,
            on_loaded=proxy.router.saw_loaded,
        )
        proxy.monitor = monitor
        await monitor.check_all()
        async with running(monitor.run()):
            yield
    finally:
        await proxy.router.close()  # background loads end before their session
        await session.close()


async def _gpu_sources(proxy: Proxy, session: aiohttp.ClientSession) -> dict[str, GpuSource]:
    """Where the monitor reads each instance's GPU memory: NVML on this host, an emulator's
    ``/gpus``, an external server's ``gpu_source`` (an ``ollamux agent``); others have none."""
    sources: dict[str, GpuSource] = {}
    configured = [] if proxy.config.instances == "auto" else list(proxy.config.instances)
    on_host = any(i.launcher in ("process", "systemd") for i in configured)
    local = await local_gpu_source() if on_host else None  # NVML, where it works
    for inst_config, inst in zip(configured, proxy.instances, strict=True):
        if inst_config.launcher == "emulated":
            sources[inst.name] = HttpGpuSource(session, inst.url + "/gpus")
        elif inst_config.gpu_source:
            url = inst_config.gpu_source.rstrip("/") + "/gpus"
            sources[inst.name] = HttpGpuSource(session, url, token=inst_config.gpu_source_token)
        elif not inst_config.remote and local is not None:
            sources[inst.name] = local
    return sources


async def _anything_else(request: web.Request) -> web.StreamResponse:
    """Paths the proxy has no rule for: a body naming a model is routed, the rest goes as is."""
    if request.method == "POST":
        return await relay.handle(request)
    return await passthrough(request)


async def serve_proxy(
    app: web.Application,
    listen: str,
    *,
    stop: asyncio.Event | None = None,
    cut: asyncio.Event | None = None,
    drain: float = 30.0,
) -> None:
    """Serve ``app`` on ``listen`` until ``stop``, then drain for up to ``drain`` seconds.

    Draining (see :mod:`proxy.api.stopping`): the socket closes, new requests on open connections
    get 503, those in flight finish; ``cut`` (or cancelling this) closes what is left at once.
    Client disconnects cancel their handlers.
    """
    host, port = parse_listen(listen)
    gate = stopping.Gate()
    app[stopping.GATE] = gate
    # Just inside the edge (build_app put it first): counts and refuses everything it lets in.
    app.middlewares.insert(1, gate.middleware)
    raise_open_files_limit()  # every client connection is an open file
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=stopping.FINAL_WRITES,
        **runner_options(app[PROXY].config.limits),
    )
    await runner.setup()
    cut = cut or asyncio.Event()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("ollamux proxy listening on http://%s:%d", host, port)
        await (stop or asyncio.Event()).wait()
        await site.stop()  # new connections are refused from here on
        await stopping.drain(gate, drain, cut)
    finally:
        if gate.in_flight:
            stopping.cut_connections(runner.server)
        # In its own task: aiohttp's shutdown gives up early inside a task being cancelled.
        await asyncio.shield(asyncio.ensure_future(runner.cleanup()))
