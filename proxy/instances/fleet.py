"""Every instance of a config, whatever its launcher, brought up and kept up until stopped.

=============  ===============================================================================
launcher       what `ollamux serve` does with it
=============  ===============================================================================
``process``    runs ``ollama serve`` pinned to its GPU(s) and supervises it (process.py)
``emulated``   runs ``ollamux emulate`` and supervises it (emulated.py)
``systemd``    connects: checks that ``ollama@NAME.service`` answers; restarts go to systemctl
``external``   connects: checks that its URL answers
=============  ===============================================================================

Once all answer, the routing proxy starts in front of them with a :class:`FleetLauncher`, through
which the admin API restarts an instance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
from dataclasses import dataclass, field

from proxy.config import Config, InstanceConfig, parse_listen
from proxy.errors import ConfigError, LaunchError
from proxy.instances.emulated import emulated_child
from proxy.instances.pinning import pin_with_nvml
from proxy.instances.ports import holder, port_problem
from proxy.instances.process import find_ollama, process_child
from proxy.instances.supervisor import (
    ChildSpec,
    RestartPolicy,
    Supervisor,
    stop_on_signals,
    unless_stopped,
    wait_ready,
)
from proxy.instances.systemctl import restart_unit
from proxy.instances.systemd import instance_unit

__all__ = ["FleetLauncher", "FleetPlan", "plan_fleet", "run_fleet", "serve", "with_listen"]

log = logging.getLogger(__name__)

_SUPERVISED = ("process", "emulated")


@dataclass(frozen=True)
class FleetPlan:
    """What `serve` will do: the processes it supervises, and the servers it only connects to."""

    children: list[ChildSpec] = field(default_factory=list)
    connect: list[InstanceConfig] = field(default_factory=list)
    """``systemd`` and ``external`` instances."""


def serve(config: Config, *, listen: str | None = None) -> None:
    """`ollamux serve`: start the instances and the routing proxy; keep them up until stopped."""
    config = pin_with_nvml(with_listen(config, listen))
    plan = plan_fleet(config)
    asyncio.run(run_fleet(config, plan))


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


def plan_fleet(config: Config) -> FleetPlan:
    """The processes to supervise and the servers to check, or LaunchError (why not)."""
    if config.instances == "auto":
        raise LaunchError("instances: auto must be pinned to this host's GPUs first")
    if not config.instances:
        raise LaunchError(f"{config.source or 'the config'}: lists no instances; nothing to start")
    plan = FleetPlan()
    binary = ""
    for inst in config.instances:
        if inst.launcher == "emulated":
            plan.children.append(emulated_child(config, inst))
        elif inst.launcher == "process":
            if not binary:
                binary = find_ollama(config)
                _check_listen(config)  # before starting a server that would be in vain
            plan.children.append(process_child(config, inst, binary))
        else:
            plan.connect.append(inst)
    return plan


class FleetLauncher:
    """Restarts through each instance's launcher: the supervisor here, or systemctl."""

    def __init__(self, config: Config, supervisor: Supervisor) -> None:
        assert config.instances != "auto"
        self._instances = {inst.name: inst for inst in config.instances}
        self._supervisor = supervisor
        self._timeouts = config.timeouts

    def describe(self, name: str) -> str:
        inst = self._instances.get(name)
        if inst is None:
            return ""
        if inst.launcher in _SUPERVISED:
            return self._supervisor.child(name).describe()
        if inst.launcher == "systemd":
            return f"systemd unit {instance_unit(name)}"
        return "external"

    async def restart(self, name: str) -> None:
        inst = self._instances.get(name)
        if inst is None:
            raise LaunchError(f"no instance is called {name!r}")
        if inst.launcher in _SUPERVISED:
            await self._supervisor.restart(name)
        elif inst.launcher == "systemd":
            await restart_unit(instance_unit(name))
            await wait_ready(
                _url(inst) + "/",
                timeout=self._timeouts.start,
                probe_timeout=self._timeouts.health_timeout,
                name=f"{name} ({instance_unit(name)})",
            )
        else:
            raise LaunchError(f"instance {name} is external: restart it where it runs")


async def run_fleet(
    config: Config,
    plan: FleetPlan,
    *,
    policy: RestartPolicy | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Check, start and supervise the instances, with the proxy in front, until ``stop``.

    Without ``stop`` SIGINT and SIGTERM stop it (what `ollamux serve` wants); tests pass their own.
    """
    timeouts = config.timeouts
    if stop is None:
        stop = asyncio.Event()
        stop_on_signals(stop)
    checks = asyncio.gather(
        *(
            wait_ready(
                _url(inst) + "/",
                timeout=timeouts.start,
                probe_timeout=timeouts.health_timeout,
                name=f"{inst.name} ({_how(inst)})",
            )
            for inst in plan.connect
        )
    )
    if not await unless_stopped(checks, stop):
        return
    policy = policy or RestartPolicy(
        start_timeout=timeouts.start, probe_timeout=timeouts.health_timeout
    )
    supervisor = Supervisor(plan.children, policy=policy)
    launcher = FleetLauncher(config, supervisor)
    proxy_task: asyncio.Task[None] | None = None

    def ready() -> None:
        nonlocal proxy_task
        for child in supervisor.children:
            log.info("%s answers at %s (pid %s)", child.name, child.spec.health_url, child.pid)
        for inst in plan.connect:
            log.info("%s answers at %s (%s)", inst.name, _url(inst), _how(inst))
        count = len(plan.children) + len(plan.connect)
        log.info("%d instance(s) up; starting the routing proxy", count)
        proxy_task = asyncio.get_running_loop().create_task(_run_proxy(config, launcher))
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


def _url(inst: InstanceConfig) -> str:
    return inst.url.rstrip("/") if inst.url else f"http://127.0.0.1:{inst.port}"


def _how(inst: InstanceConfig) -> str:
    return instance_unit(inst.name) if inst.launcher == "systemd" else inst.launcher


def _check_listen(config: Config) -> None:
    host, port = parse_listen(config.listen)
    problem = port_problem(host, port)
    if problem:
        raise LaunchError(f"the proxy cannot listen on {config.listen}: {problem}; {_LISTEN_FIX}")


_LISTEN_FIX = (
    "if the stock Ollama holds it, stop it (sudo systemctl disable --now ollama), "
    "or pass --listen HOST:PORT"
)


async def _run_proxy(config: Config, launcher: FleetLauncher) -> None:
    """The routing proxy on ``config.listen`` in front of the instances, until cancelled."""
    from proxy.app import build_app, serve_proxy  # the proxy's modules load only when serving

    try:
        await serve_proxy(build_app(config, launcher=launcher), config.listen)
    except OSError as exc:
        port = parse_listen(config.listen)[1]
        held = f", held by {holder(port)}" if exc.errno == errno.EADDRINUSE else ""
        raise LaunchError(
            f"the proxy cannot listen on {config.listen}: {exc.strerror or exc}{held}; "
            + _LISTEN_FIX
        ) from None
