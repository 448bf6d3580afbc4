"""Supervised child servers: spawn, readiness, prefixed output, restarts, stop with no orphans.

Generic over what runs: a :class:`ChildSpec` is a command, extra environment and a health URL that
answers ``GET`` with 200 once the server is ready (an emulator, or a real ``ollama serve``); one
running child is a :class:`~proxy.instances.child.Child`.

No orphans: each child leads its own process group, so stopping signals the whole group
(SIGTERM, then SIGKILL after ``stop_timeout``), and on Linux the kernel sends it SIGTERM when this
process dies, however it dies (``prctl(PR_SET_PDEATHSIG)``), SIGKILL included.

Signal handlers only set events (:func:`stop_on_signals`: the first signal asks for a graceful
stop, the second for stopping at once); one loop (:meth:`Supervisor.supervise`)
notices crashed children and restarts them with exponential backoff, giving up on a child that
crashes more than ``crash_limit`` times within ``crash_window`` seconds. :meth:`Supervisor.restart`
restarts one child on request (the admin API's restart); the loop leaves that child alone meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from proxy.errors import LaunchError
from proxy.instances.child import Child, ChildSpec, describe_exit, label, wait_ready
from proxy.logs import child_line, current_format

__all__ = [
    "Child",
    "ChildSpec",
    "RestartPolicy",
    "Supervisor",
    "stop_on_signals",
    "unless_stopped",
    "wait_ready",
]

log = logging.getLogger("ollamux.supervisor")


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """Timing of readiness, restarts and stopping (seconds)."""

    start_timeout: float = 60.0
    stop_timeout: float = 10.0
    probe_interval: float = 0.2
    probe_timeout: float = 2.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    crash_limit: int = 5
    """Crashes within ``crash_window`` after which a child is given up."""
    crash_window: float = 60.0
    poll_interval: float = 0.5
    """How often the supervising loop looks at its children."""

    def backoff(self, crashes: int) -> float:
        """Delay before the restart that follows the ``crashes``-th recent crash (1, 2, ...)."""
        return float(min(self.backoff_max, self.backoff_initial * 2 ** max(crashes - 1, 0)))


def stop_on_signals(stop: asyncio.Event, cut: asyncio.Event | None = None) -> None:
    """Make SIGINT and SIGTERM set ``stop``, and the next one ``cut``; the handlers do nothing else.

    ``stop`` asks for a graceful stop (the proxy drains), ``cut`` for stopping at once.
    """
    loop = asyncio.get_running_loop()

    def handle() -> None:
        if stop.is_set() and cut is not None:
            cut.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off Unix
            loop.add_signal_handler(sig, handle)


async def unless_stopped(work: Awaitable[object], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first; then cancel it and return False."""
    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not working.done():
            working.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await working
    if working.cancelled():
        return False
    working.result()
    return True


class Supervisor:
    """Starts children, waits until they answer, restarts those that crash, stops them all."""

    def __init__(
        self,
        specs: Iterable[ChildSpec],
        *,
        policy: RestartPolicy | None = None,
        output: TextIO | None = None,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self._output = output
        specs = list(specs)
        width = max((len(s.name) for s in specs), default=0)
        self.children = [Child(s, self._writer(s.name.ljust(width))) for s in specs]
        self._stopping = False
        self._restarts: set[asyncio.Task[None]] = set()

    async def run(
        self, stop: asyncio.Event, *, on_ready: Callable[[], None] = lambda: None
    ) -> None:
        """Start all, call ``on_ready`` once they answer, supervise until ``stop``, stop all."""
        try:
            if await unless_stopped(self.start(), stop):
                on_ready()
                await self.supervise(stop)
        finally:
            await self.stop()

    async def start(self) -> None:
        """Spawn every child and wait until each answers; LaunchError names the first that did not.

        Children already started stay running on failure: :meth:`stop` them.
        """
        for child in self.children:
            await child.spawn()
        if not self.children:
            return
        waits = [asyncio.ensure_future(child.wait_ready(self.policy)) for child in self.children]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in waits:
                task.cancel()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart crashed children until ``stop`` is set; LaunchError once every child gave up."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            for child in self.children:
                await self._check(child, loop.time())
            if self.children and all(child.given_up for child in self.children):
                raise LaunchError("every instance crashed repeatedly; gave up on all of them")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.policy.poll_interval)

    async def stop(self) -> None:
        """Stop every child at once (SIGTERM, then SIGKILL after the policy's stop timeout)."""
        # Restarts on request first, so none spawns a child after this.
        self._stopping = True
        for task in self._restarts:
            task.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        await asyncio.gather(*(child.stop(self.policy.stop_timeout) for child in self.children))

    def child(self, name: str) -> Child:
        """The child called ``name``; LaunchError if there is none."""
        for child in self.children:
            if child.name == name:
                return child
        raise LaunchError(f"no supervised instance is called {name!r}")

    async def restart(self, name: str) -> None:
        """Stop child ``name`` and start it again now; returns once it answers (LaunchError if not).

        Not counted as a crash; a child the loop gave up on is supervised again afterwards.
        """
        child = self.child(name)
        if self._stopping:
            raise LaunchError(f"instance {name}: not restarted, every instance is stopping")
        if child.restarting:
            raise LaunchError(f"instance {name} is already being restarted")
        child.restarting = True
        task = asyncio.ensure_future(self._restart(child))
        self._restarts.add(task)

        def done(_task: asyncio.Task[None]) -> None:
            self._restarts.discard(task)
            child.restarting = False

        task.add_done_callback(done)
        # Shielded: a caller that goes away (an HTTP client) does not leave it half done.
        await asyncio.shield(task)

    async def _restart(self, child: Child) -> None:
        log.info("restarting %s on request (pid %s)%s", child.name, child.pid, label(child.spec))
        async with child.spawning:
            await child.stop(self.policy.stop_timeout)
            child.crashes.clear()
            child.given_up = False
            child.restart_at = None
            await child.spawn()
        await child.wait_ready(self.policy)
        log.info("%s is back (pid %s)", child.name, child.pid)

    async def _check(self, child: Child, now: float) -> None:
        if child.given_up or child.restarting:
            return
        if child.restart_at is not None:
            if now >= child.restart_at:
                async with child.spawning:
                    if child.restarting or child.restart_at is None:
                        return  # restarted on request in the meantime
                    child.restart_at = None
                    try:
                        await child.spawn()
                    except LaunchError as exc:
                        log.error("%s", exc)
                        self._crashed(child, now, "could not be started")
            return
        code = child.returncode
        if code is not None:
            self._crashed(child, now, f"exited ({describe_exit(code)})")

    def _crashed(self, child: Child, now: float, what: str) -> None:
        policy = self.policy
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > policy.crash_window:
            child.crashes.popleft()
        pid = f"pid {child.pid}, " if child.pid is not None else ""
        if len(child.crashes) > policy.crash_limit:
            child.given_up = True
            log.error(
                "%s (%s%s) crashed %d times within %g s; giving up on it; last output:\n%s",
                child.name, pid, what, len(child.crashes), policy.crash_window, child.last_output(),
            )  # fmt: skip
            return
        delay = policy.backoff(len(child.crashes))
        child.restart_at = now + delay
        log.warning("%s %s (%s); restarting it in %g s", child.name, what, pid.rstrip(", "), delay)

    def _writer(self, prefix: str) -> Callable[[str], None]:
        fmt = current_format()

        def write(line: str) -> None:
            out = self._output or sys.stderr
            out.write(child_line(prefix, line, fmt) + "\n")
            out.flush()

        return write
