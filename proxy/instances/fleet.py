"""Every instance of a config, whatever its launcher, brought up and kept up until stopped.

=============  ===============================================================================
launcher       what `ollamux serve` does with it
=============  ===============================================================================
``process``    runs ``ollama serve`` pinned to its GPU(s) and supervises it (process.py)
``emulated``   runs ``ollamux emulate`` and supervises it (emulated.py)
``systemd``    connects to ``ollama@NAME.service``; restarts go to systemctl
``external``   connects to its URL
=============  ===============================================================================

Once every launched instance answers (a launched one that cannot start fails `serve` at once), the
routing proxy starts in front of them with a :class:`FleetLauncher`, through which the admin API
restarts an instance. A connected instance that does not answer yet only delays the start while
nothing else answers (up to ``timeouts.start``); it starts marked down and the monitor picks it up
once it answers.

Stopping (SIGTERM, Ctrl-C): the proxy drains first (see :mod:`proxy.api.stopping`), then the
supervisor stops the instances; a second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import logging
import os
from dataclasses import dataclass, field

import aiohttp

from proxy import eventloop
from proxy.config import Config, InstanceConfig, TimeoutConfig, parse_listen
from proxy.errors import ConfigError, LaunchError
from proxy.frontdoor import env_origins
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
from proxy.instances.unit_files import instance_unit

__all__ = [
    "FleetLauncher",
    "FleetPlan",
    "check_connected",
    "check_ports",
    "plan_fleet",
    "run_fleet",
    "serve",
    "with_listen",
]

log = logging.getLogger("ollamux.fleet")

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
    env_origins(os.environ)  # a bad OLLAMA_ORIGINS stops us before any instance starts
    from_file = config.source and not config.source.startswith("--")  # flags name themselves
    for warning in config.warnings:  # what `config check` prints as `# warning:` lines
        log.warning("%s%s", f"{config.source}: " if from_file else "", warning)
    plan = plan_fleet(config)
    eventloop.run(run_fleet(config, plan))


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
            if not inst.remote and inst.port == port:
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
    check_ports(config)  # every port before anything starts, emulated instances' included
    return plan


def check_ports(config: Config, *, fix: str = "") -> None:
    """LaunchError naming the first port of ``config`` that is held: the proxy's, then each
    supervised instance's. ``fix`` replaces the usual advice (e.g. `ollamux demo`'s --listen)."""
    host, port = parse_listen(config.listen)
    problem = port_problem(host, port)
    if problem:
        raise LaunchError(
            f"the proxy cannot listen on {config.listen}: {problem}; {fix or _LISTEN_FIX}"
        )
    for inst in config.instances if config.instances != "auto" else ():
        if inst.launcher in _SUPERVISED:
            problem = port_problem("127.0.0.1", inst.port)
            if problem:
                raise LaunchError(f"instance {inst.name}: {problem}; {fix or _INSTANCE_FIX}")


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
        return inst.launcher  # external or node: it runs elsewhere

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
    cut: asyncio.Event | None = None,
) -> None:
    """Start and supervise the instances, with the proxy in front, until ``stop``.

    On ``stop`` the proxy drains first (``timeouts.drain``; ``cut`` ends the drain at once), then
    the instances stop. Without ``stop`` the first SIGINT or SIGTERM sets ``stop`` and the second
    ``cut`` (what `ollamux serve` wants); tests pass their own events.
    """
    if stop is None:
        stop, cut = asyncio.Event(), asyncio.Event()
        stop_on_signals(stop, cut)
    cut = cut or asyncio.Event()
    timeouts = config.timeouts
    policy = policy or RestartPolicy(
        start_timeout=timeouts.start, probe_timeout=timeouts.health_timeout
    )
    supervisor = Supervisor(plan.children, policy=policy)
    launcher = FleetLauncher(config, supervisor)
    halt = asyncio.Event()
    """The instances stop: once the proxy has drained, or at once while there is no proxy yet."""
    proxy_task: asyncio.Task[None] | None = None

    def ready() -> None:
        nonlocal proxy_task
        for child in supervisor.children:
            log.info("%s answers at %s (pid %s)", child.name, child.spec.health_url, child.pid)
        proxy = _run_proxy(config, launcher, plan, stop, cut)
        proxy_task = asyncio.get_running_loop().create_task(proxy)
        proxy_task.add_done_callback(lambda _task: halt.set())  # no proxy, no point: stop all

    async def halt_on_stop() -> None:
        await stop.wait()
        if proxy_task is None:
            halt.set()

    watch = asyncio.ensure_future(halt_on_stop())
    try:
        await supervisor.run(halt, on_ready=ready)
    finally:
        watch.cancel()
        if proxy_task is not None:  # done already, unless the supervisor failed: cut it short
            stop.set()
            cut.set()
            await asyncio.gather(proxy_task, watch, return_exceptions=True)
    log.info("all instances stopped")
    if proxy_task is not None and not proxy_task.cancelled() and proxy_task.exception():
        raise LaunchError(str(proxy_task.exception()))


async def check_connected(
    connect: list[InstanceConfig], timeouts: TimeoutConfig, *, others_up: bool
) -> list[InstanceConfig]:
    """Which ``connect`` instances answer ``GET /`` now; those that do not are logged as down.

    One round of probes when ``others_up`` (there is somewhere to route already), else rounds
    until one answers or ``timeouts.start`` passes. The monitor keeps probing those down.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeouts.start
    answered: list[InstanceConfig] = []
    last: dict[str, str] = {}
    client_timeout = aiohttp.ClientTimeout(total=timeouts.health_timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:

        async def probe(inst: InstanceConfig) -> None:
            try:
                async with session.get(_url(inst) + "/") as response:
                    if response.status == 200:
                        answered.append(inst)
                        return
                    last[inst.name] = f"HTTP {response.status}"
            except aiohttp.ClientConnectorError as exc:
                err = exc.os_error
                last[inst.name] = f"cannot connect: {os.strerror(err.errno) if err.errno else err}"
            except asyncio.TimeoutError:
                last[inst.name] = f"no answer within {timeouts.health_timeout:g} s"
            except (aiohttp.ClientError, OSError) as exc:
                last[inst.name] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

        for attempt in itertools.count():
            await asyncio.gather(*(probe(inst) for inst in connect if inst not in answered))
            if others_up or answered or not connect or loop.time() >= deadline:
                break
            if attempt == 0:
                log.info(
                    "no instance answers yet; waiting up to %g s (timeouts.start) for a first one",
                    timeouts.start,
                )
            await asyncio.sleep(_PROBE_INTERVAL)
    for inst in connect:
        if inst in answered:
            log.info("%s answers at %s (%s)", inst.name, _url(inst), _how(inst))
        else:
            log.warning(
                "%s (%s) does not answer %s/ (last try: %s); it is marked down, and the proxy "
                "keeps probing it and routes to it once it answers",
                inst.name, _how(inst), _url(inst), last.get(inst.name, "no answer"),
            )  # fmt: skip
    return [inst for inst in connect if inst in answered]


_PROBE_INTERVAL = 0.2


def _url(inst: InstanceConfig) -> str:
    return inst.url.rstrip("/") if inst.url else f"http://127.0.0.1:{inst.port}"


def _how(inst: InstanceConfig) -> str:
    return instance_unit(inst.name) if inst.launcher == "systemd" else inst.launcher


def _check_listen(config: Config) -> None:
    host, port = parse_listen(config.listen)
    problem = port_problem(host, port)
    if problem:
        raise LaunchError(f"the proxy cannot listen on {config.listen}: {problem}; {_LISTEN_FIX}")


_INSTANCE_FIX = "stop that process, or give the instance another port in the config"
_LISTEN_FIX = (
    "if the stock Ollama holds it, stop it (sudo systemctl disable --now ollama), "
    "or pass --listen HOST:PORT"
)


async def _run_proxy(
    config: Config,
    launcher: FleetLauncher,
    plan: FleetPlan,
    stop: asyncio.Event,
    cut: asyncio.Event,
) -> None:
    """The routing proxy on ``config.listen`` in front of the instances, until drained."""
    from proxy.app import build_app, serve_proxy  # the proxy's modules load only when serving

    checking = asyncio.ensure_future(
        check_connected(plan.connect, config.timeouts, others_up=bool(plan.children))
    )
    if not await unless_stopped(checking, stop):
        return
    total = len(plan.children) + len(plan.connect)
    up = len(plan.children) + len(checking.result())
    if up == total:
        log.info("%d instance(s) up; starting the routing proxy", total)
    elif up:
        log.info("%d of %d instance(s) up; starting the routing proxy", up, total)
    else:
        log.warning(
            "0 of %d instance(s) up after %g s (timeouts.start); starting the routing proxy "
            "anyway: requests get 503 until one answers",
            total,
            config.timeouts.start,
        )
    try:
        await serve_proxy(
            build_app(config, launcher=launcher),
            config.listen,
            stop=stop,
            cut=cut,
            drain=config.timeouts.drain,
        )
    except OSError as exc:
        port = parse_listen(config.listen)[1]
        held = f", held by {holder(port)}" if exc.errno == errno.EADDRINUSE else ""
        raise LaunchError(
            f"the proxy cannot listen on {config.listen}: {exc.strerror or exc}{held}; "
            + _LISTEN_FIX
        ) from None
