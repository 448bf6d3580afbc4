"""One supervised child process: its spec, spawn, readiness, prefixed output and stop.

A child leads its own process group, so stopping signals the whole group (SIGTERM, then SIGKILL
after a timeout), and on Linux the kernel sends it SIGTERM when this process dies, however it dies
(``prctl(PR_SET_PDEATHSIG)``), SIGKILL included. :mod:`proxy.instances.supervisor` decides when.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from proxy.errors import LaunchError
from proxy.instances.ports import foreign_listener

if TYPE_CHECKING:
    from proxy.instances.supervisor import RestartPolicy

__all__ = ["PARENT_DEATH_SIGNAL", "Child", "ChildSpec", "describe_exit", "wait_ready"]

log = logging.getLogger("ollamux.supervisor")

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
    unset: tuple[str, ...] = ()
    """Variables of the supervisor's environment the child must not inherit."""
    label: str = ""
    """Shown in log lines, e.g. ``GPU rtx4090-0 (24 GiB)``."""


async def wait_ready(
    url: str,
    *,
    timeout: float,
    interval: float = 0.2,
    probe_timeout: float = 2.0,
    exited: Callable[[], int | None] = lambda: None,
    name: str = "",
    tail: Callable[[], str] = lambda: "",
    foreign: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``GET url`` until it answers 200; LaunchError if the child exits or time runs out.

    ``foreign`` is asked once ``url`` answers: empty when the answer is the child's, else who
    answers instead (LaunchError at once: the child will not get the port).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer yet"
    client_timeout = aiohttp.ClientTimeout(total=probe_timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        other = foreign()
                        if not other:
                            return
                        raise LaunchError(
                            f"instance {name}: {url} is answered by {other}, not by the instance "
                            "just started; stop that process, or give the instance another port"
                        )
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            code = exited()
            if code is not None:
                raise LaunchError(
                    f"instance {name} exited ({describe_exit(code)}) before answering {url}"
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
        self.restarting = False
        """Being restarted on request: the supervising loop leaves it alone."""
        self._write = write
        self._pump: asyncio.Task[None] | None = None
        self.spawning = asyncio.Lock()
        """Held while it is being (re)started, so a restart on request and one after a crash
        never start two processes."""

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

    def describe(self) -> str:
        """Its state in a few words, e.g. ``running (pid 1234)`` or ``given up after 6 crashes``."""
        if self.restarting:
            return "restarting on request"
        if self.given_up:
            return f"given up after {len(self.crashes)} crashes"
        if self.restart_at is not None:
            return f"crashed; restarting (crash {len(self.crashes)})"
        if self.returncode is None and self.pid is not None:
            return f"running (pid {self.pid})"
        return "not running"

    async def spawn(self) -> None:
        """Start the process in its own process group, with its output pumped to ``write``."""
        env = {k: v for k, v in os.environ.items() if k not in self.spec.unset}
        env.update(self.spec.env)
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
        log.info("started %s (pid %d)%s", self.name, self.process.pid, label(self.spec))

    async def wait_ready(self, policy: RestartPolicy) -> None:
        await wait_ready(
            self.spec.health_url,
            timeout=policy.start_timeout,
            interval=policy.probe_interval,
            probe_timeout=policy.probe_timeout,
            exited=lambda: self.returncode,
            name=self.name,
            tail=self.last_output,
            foreign=self._foreign_listener,
        )

    def _foreign_listener(self) -> str:
        """Who listens on the health URL's port if not this child's process group, else ""."""
        port = urlsplit(self.spec.health_url).port
        if port is None or self.pid is None:
            return ""
        return foreign_listener(port, self.pid)  # the child leads its own process group

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
            log.info("stopped %s (pid %d, %s)", self.name, proc.pid, describe_exit(proc.returncode))
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


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def label(spec: ChildSpec) -> str:
    return f": {spec.label}" if spec.label else ""


def _with_tail(tail: str) -> str:
    return f"; its last output:\n{tail}" if tail.strip() else "; it printed nothing"
