"""Supervised child servers: spawn, readiness, prefixed output, restarts, stop with no orphans.

Generic over what runs: a :class:`ChildSpec` is a command, extra environment and a health URL that
answers ``GET`` with 200 once the server is ready (an emulator, or a real ``ollama serve``).

No orphans: each child leads its own process group, so stopping signals the whole group
(SIGTERM, then SIGKILL after ``stop_timeout``), and on Linux the kernel sends it SIGTERM when this
process dies, however it dies (``prctl(PR_SET_PDEATHSIG)``), SIGKILL included.

Signal handlers only set an event (:func:`stop_on_signals`); one loop (:meth:`Supervisor.supervise`)
notices crashed children and restarts them with exponential backoff, giving up on a child that
crashes more than ``crash_limit`` times within ``crash_window`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp

from proxy.errors import LaunchError

__all__ = [
    "Child",
    "ChildSpec",
    "RestartPolicy",
    "Supervisor",
    "stop_on_signals",
    "unless_stopped",
    "wait_ready",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
PARENT_DEATH_SIGNAL = signal.SIGTERM
"""What a child gets when its supervisor dies: SIGTERM, so a real Ollama still stops its runners."""
_TAIL_LINES = 20


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """How to run one supervised server."""

    name: str
    argv: tuple[str, ...]
    health_url: str
    """Answers ``GET`` with 200 once the server is ready, e.g. ``http://127.0.0.1:11435/``."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Added to (and overriding) the supervisor's own environment."""
    label: str = ""
    """Shown in log lines, e.g. ``GPU rtx4090-0 (24 GiB)``."""


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


def stop_on_signals(stop: asyncio.Event) -> None:
    """Make SIGINT and SIGTERM set ``stop``; the handlers do nothing else."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off Unix
            loop.add_signal_handler(sig, stop.set)


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


async def wait_ready(
    url: str,
    *,
    timeout: float,
    interval: float = 0.2,
    probe_timeout: float = 2.0,
    exited: Callable[[], int | None] = lambda: None,
    name: str = "",
    tail: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``GET url`` until it answers 200; LaunchError if the child exits or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer yet"
    client_timeout = aiohttp.ClientTimeout(total=probe_timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            code = exited()
            if code is not None:
                raise LaunchError(
                    f"instance {name} exited ({_describe_exit(code)}) before answering {url}"
                    + _with_tail(tail())
                )
            if loop.time() >= deadline:
                raise LaunchError(
                    f"instance {name} did not answer {url} within {timeout:g} s "
                    f"(last try: {last}); raise timeouts.start if it needs longer"
                    + _with_tail(tail())
                )
            await asyncio.sleep(interval)


class Child:
    """One supervised process: its spec, the current process and the last lines it printed."""

    def __init__(self, spec: ChildSpec, write: Callable[[str], None]) -> None:
        self.spec = spec
        self.process: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.crashes: collections.deque[float] = collections.deque()
        self.restart_at: float | None = None
        self.given_up = False
        self._write = write
        self._pump: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running (or before the first start)."""
        return self.process.returncode if self.process is not None else None

    def last_output(self) -> str:
        return "\n".join(self.tail)

    async def spawn(self) -> None:
        """Start the process in its own process group, with its output pumped to ``write``."""
        env = {**os.environ, **self.spec.env}
        self.tail.clear()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
                limit=1 << 20,
            )
        except OSError as exc:
            raise LaunchError(
                f"instance {self.name}: cannot run {self.spec.argv[0]!r}: {exc.strerror or exc}"
            ) from None
        assert self.process.stdout is not None
        self._pump = asyncio.ensure_future(self._copy_output(self.process.stdout))
        log.info("started %s (pid %d)%s", self.name, self.process.pid, _label(self.spec))

    async def wait_ready(self, policy: RestartPolicy) -> None:
        await wait_ready(
            self.spec.health_url,
            timeout=policy.start_timeout,
            interval=policy.probe_interval,
            probe_timeout=policy.probe_timeout,
            exited=lambda: self.returncode,
            name=self.name,
            tail=self.last_output,
        )

    async def stop(self, timeout: float) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout``, and reap it."""
        proc = self.process
        if proc is None:
            return
        if proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %g s; killing it", self.name, proc.pid, timeout
                )
                self._signal_group(signal.SIGKILL)
                await proc.wait()
            log.info(
                "stopped %s (pid %d, %s)", self.name, proc.pid, _describe_exit(proc.returncode)
            )
        # Whatever the leader left behind in its group goes too.
        self._signal_group(signal.SIGKILL)
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, 2.0)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        # The group id is the leader's pid, which the kernel does not reuse while the group lives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def _copy_output(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the reader's limit; it was dropped
                raw = b"[line too long, dropped]\n"
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.tail.append(line)
            self._write(line)


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
        await asyncio.gather(*(child.stop(self.policy.stop_timeout) for child in self.children))

    async def _check(self, child: Child, now: float) -> None:
        if child.given_up:
            return
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = None
                try:
                    await child.spawn()
                except LaunchError as exc:
                    log.error("%s", exc)
                    self._crashed(child, now, "could not be started")
            return
        code = child.returncode
        if code is not None:
            self._crashed(child, now, f"exited ({_describe_exit(code)})")

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
        def write(line: str) -> None:
            out = self._output or sys.stderr
            out.write(f"{prefix} | {line}\n")
            out.flush()

        return write


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook asking Linux to signal the child when this process dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), PARENT_DEATH_SIGNAL)

    return preexec


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _label(spec: ChildSpec) -> str:
    return f": {spec.label}" if spec.label else ""


def _with_tail(tail: str) -> str:
    return f"; its last output:\n{tail}" if tail.strip() else "; it printed nothing"
