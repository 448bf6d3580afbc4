"""Every instance of a config, whatever its launcher, brought up and kept up until stopped."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from proxy.config import Config, InstanceConfig, parse_listen
from proxy.errors import ConfigError, LaunchError
from proxy.instances.emulated import emulated_child
from proxy.instances.supervisor import (
    ChildSpec,
    RestartPolicy,
    Supervisor,
    stop_on_signals,
    unless_stopped,
    wait_ready,
)

__all__ = ["plan_children", "serve", "with_listen"]

log = logging.getLogger(__name__)

_LATER = "arrives in a later release of ollamux"


def serve(config: Config, *, listen: str | None = None) -> None:
    """`ollamux serve`: start the instances and the routing proxy; keep them up until stopped."""
    config = with_listen(config, listen)
    children, external = plan_children(config)
    asyncio.run(_serve(config, children, external))


def with_listen(config: Config, listen: str | None) -> Config:
    """``config`` with its listen address replaced by ``--listen``, checked like the file's."""
    if listen is None:
        return config
    try:
        _, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(str(exc), path="--listen") from None
    if config.instances != "auto":
        for i, inst in enumerate(config.instances):
            if inst.launcher != "external" and inst.port == port:
                raise ConfigError(
                    f"port {port} is already used by instances[{i}] ({inst.name}); pick another",
                    path="--listen",
                )
    return dataclasses.replace(config, listen=listen)


def plan_children(config: Config) -> tuple[list[ChildSpec], list[InstanceConfig]]:
    """The processes to supervise and the external instances to check, or LaunchError (why not)."""
    if config.instances == "auto":
        raise LaunchError(
            f"{config.source or 'the config'}: instances: auto needs NVIDIA GPU discovery (NVML), "
            f"which {_LATER} together with the process launcher. Try the emulated demo box: "
            "ollamux serve --config config/demo.yaml"
        )
    if not config.instances:
        raise LaunchError(f"{config.source or 'the config'}: lists no instances; nothing to start")
    children: list[ChildSpec] = []
    external: list[InstanceConfig] = []
    for i, inst in enumerate(config.instances):
        if inst.launcher == "emulated":
            children.append(emulated_child(config, inst))
        elif inst.launcher == "external":
            external.append(inst)
        else:
            raise LaunchError(
                f"instances[{i}] ({inst.name}): launcher {inst.launcher!r} {_LATER}; for now use "
                "launcher: emulated (see config/demo.yaml), or launcher: external with the url of "
                "an Ollama you started yourself"
            )
    return children, external


async def _serve(config: Config, children: list[ChildSpec], external: list[InstanceConfig]) -> None:
    timeouts = config.timeouts
    stop = asyncio.Event()
    stop_on_signals(stop)
    checks = asyncio.gather(
        *(
            wait_ready(
                inst.url.rstrip("/") + "/",
                timeout=timeouts.start,
                probe_timeout=timeouts.health_timeout,
                name=f"{inst.name} (external)",
            )
            for inst in external
        )
    )
    if not await unless_stopped(checks, stop):
        return
    policy = RestartPolicy(start_timeout=timeouts.start, probe_timeout=timeouts.health_timeout)
    supervisor = Supervisor(children, policy=policy)

    proxy_task: asyncio.Task[None] | None = None

    def ready() -> None:
        nonlocal proxy_task
        for child in supervisor.children:
            log.info("%s answers at %s (pid %s)", child.name, child.spec.health_url, child.pid)
        for inst in external:
            log.info("%s answers at %s (external)", inst.name, inst.url)
        log.info("%d instance(s) up; starting the routing proxy", len(children) + len(external))
        proxy_task = asyncio.get_running_loop().create_task(_run_proxy(config))
        proxy_task.add_done_callback(lambda _task: stop.set())  # no proxy, no point: stop all

    try:
        await supervisor.run(stop, on_ready=ready)
    finally:
        if proxy_task is not None:
            proxy_task.cancel()
            await asyncio.gather(proxy_task, return_exceptions=True)
    log.info("all instances stopped")
    if proxy_task is not None and not proxy_task.cancelled() and proxy_task.exception():
        raise LaunchError(str(proxy_task.exception()))


async def _run_proxy(config: Config) -> None:
    """The routing proxy on ``config.listen`` in front of the instances, until cancelled."""
    from proxy.app import build_app, serve_proxy  # the proxy's modules load only when serving

    try:
        await serve_proxy(build_app(config), config.listen)
    except OSError as exc:
        raise LaunchError(
            f"the proxy cannot listen on {config.listen}: {exc.strerror or exc}; if an Ollama "
            "already holds that port, stop it (systemctl stop ollama) or pass --listen HOST:PORT"
        ) from None
