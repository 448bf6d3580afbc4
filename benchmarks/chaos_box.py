"""The chaos benchmark's box: one `ollamux serve` on four emulated GPUs, its faults, its vitals.

:class:`Box` writes a config like ``config/demo.yaml`` on free loopback ports with its own
``models_dir``, starts ``ollamux serve`` from a source tree, injects faults (signals to an
instance's process, ``POST /emulator/faults``) and reads what the proxy says about itself
(``/proxy/status``, ``/proxy/instances``, ``/metrics``, its RSS). :class:`Poller` samples that
every 0.2 s into :class:`Sample` s. Stopping always resumes stopped instances first and kills
whatever the serve process left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.chaos_client import Clock
from benchmarks.procs import ROOT, Child, children_of, free_port, ollamux_argv

GPUS = (("rtx4090-0", 24, 1.0), ("rtx4090-1", 24, 1.0), ("l40s-0", 48, 0.85), ("l40s-1", 48, 0.85))
"""config/demo.yaml's machine: (name, GiB, speed)."""
_PID = re.compile(r"\(pid (\d+)\)")
_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


@dataclass(frozen=True, kw_only=True)
class Sample:
    """What the proxy said about its instances at ``t`` (scenario clock); empty when it did not
    answer."""

    t: float
    states: dict[str, str] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    bindings: dict[str, int] = field(default_factory=dict)
    """Requests routed to each instance since the start (the sum of its ``reasons``)."""
    slots: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    rss: int | None = None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def rss_of(pid: int) -> int | None:
    """Resident set size in bytes (Linux /proc), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _is_emulator(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"proxy" in argv and b"emulate" in argv


class Box:
    """One ``ollamux serve`` with the demo box's four emulated instances, on free ports."""

    def __init__(
        self,
        workdir: Path,
        *,
        speed: float,
        src: Path = ROOT,
        overrides: dict[str, Any] | None = None,
        name: str = "chaos",
    ) -> None:
        self.workdir = workdir
        self.speed = speed
        self.src = src
        self.overrides = overrides or {}
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: Child | None = None
        self.session: aiohttp.ClientSession | None = None
        self.emulators: set[int] = set()
        """Every instance pid seen: resumed and killed at the end whatever happened."""
        self.stopped: set[int] = set()
        self.pollers: list[Poller] = []

    def config(self) -> dict[str, Any]:
        models = self.workdir / f"{self.name}-models"
        doc: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "models_dir": str(models),
            "emulator": {
                "speed": self.speed,
                "gpus": [{"name": n, "memory_gib": g, "speed": s} for n, g, s in GPUS],
            },
            "instances": [
                {
                    "name": f"gpu{i}",
                    "launcher": "emulated",
                    "gpu": gpu[0],
                    "port": free_port(),
                    "num_parallel": 4,
                    "context_length": 8192,
                }
                for i, gpu in enumerate(GPUS)
            ],
        }
        return _merge(doc, self.overrides)

    async def start(self, timeout: float = 60.0) -> None:
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        argv = ollamux_argv("--log-level", "warning", "serve", "--config", str(path))
        self.child = Child("ollamux", argv, log=self.workdir / f"{self.name}.log", cwd=self.src)
        self.session = aiohttp.ClientSession(timeout=_TIMEOUT)
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive():
                raise RuntimeError(f"ollamux serve exited early:\n{self.child.tail()}")
            status = await self.status()
            if status and all(i.get("state") == "up" for i in status["instances"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ollamux serve not up within {timeout:g} s:\n{self.child.tail()}"
                )
            await asyncio.sleep(0.1)
        await self.pids()

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def rss(self) -> int | None:
        return rss_of(self.pid) if self.child is not None else None

    async def _get(self, path: str) -> Any:
        assert self.session is not None
        try:
            async with self.session.get(self.url + path) as resp:
                if resp.status != 200:
                    return None
                return await (resp.json() if path.startswith("/proxy") else resp.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None

    async def status(self) -> dict[str, Any] | None:
        data = await self._get("/proxy/status")
        return data if isinstance(data, dict) and "instances" in data else None

    async def pids(self) -> dict[str, int]:
        """Instance name -> pid of its process, from ``/proxy/instances``."""
        data = await self._get("/proxy/instances")
        out: dict[str, int] = {}
        for inst in (data or {}).get("instances", []):
            found = _PID.search(str(inst.get("process", "")))
            if found:
                out[inst["name"]] = int(found.group(1))
        self.emulators.update(out.values())
        return out

    async def instance_url(self, name: str) -> str:
        status = await self.status()
        assert status is not None, "the proxy does not answer"
        return str(next(i["url"] for i in status["instances"] if i["name"] == name))

    async def fault(self, name: str, **knobs: Any) -> None:
        """``POST /emulator/faults`` on instance ``name`` directly."""
        assert self.session is not None
        url = await self.instance_url(name)
        async with self.session.post(url + "/emulator/faults", json=knobs) as resp:
            resp.raise_for_status()

    async def signal(self, name: str, sig: signal.Signals) -> int:
        """Send ``sig`` to instance ``name``'s process; its pid."""
        pid = (await self.pids())[name]
        if sig == signal.SIGSTOP:
            self.stopped.add(pid)
        os.kill(pid, sig)
        if sig == signal.SIGCONT:
            self.stopped.discard(pid)
        return pid

    async def inflight(self) -> dict[str, int | None]:
        """What the proxy still counts in flight: ``/proxy/status`` (and its queue) and the
        ``ollamux_inflight`` gauge of ``/metrics``; None where it did not answer."""
        status = await self.status()
        text = await self._get("/metrics")
        gauge: int | None = None
        if isinstance(text, str):
            gauge = sum(
                int(float(line.rsplit(" ", 1)[1]))
                for line in text.splitlines()
                if line.startswith("ollamux_inflight{")
            )
        return {
            "status": sum(int(i.get("inflight_total", 0)) for i in status["instances"])
            if status else None,
            "queued": int(status.get("queued", 0)) if status else None,
            "metrics": gauge,
        }  # fmt: skip

    async def settle(self, clock: Clock, until: float) -> dict[str, int | None]:
        """Poll until nothing is in flight or queued, or ``until`` on the clock; the last look."""
        while True:
            seen = await self.inflight()
            if not any(seen.values()) or clock() >= until:
                return seen
            await asyncio.sleep(0.2)

    def poller(self, clock: Clock) -> Poller:
        """A :class:`Poller` of this box, started now and stopped with the box at the latest."""
        poller = Poller(self, clock)
        self.pollers.append(poller)
        poller.start()
        return poller

    async def stop(self) -> None:
        """Resume stopped instances, stop serve (SIGTERM, then SIGKILL), kill what is left."""
        for poller in self.pollers:
            await poller.stop()
        if self.child is not None:
            self.emulators.update(children_of(self.pid))
            for pid in self.emulators:
                if _is_emulator(pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGCONT)
            await asyncio.to_thread(self.child.stop, 8.0)
            deadline = time.monotonic() + 3.0
            while any(_is_emulator(p) for p in self.emulators) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for pid in self.emulators:
                if _is_emulator(pid):
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
        if self.session is not None:
            await self.session.close()

    async def __aenter__(self) -> Box:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class Poller:
    """Samples the proxy's status and RSS every ``interval`` s while a scenario runs."""

    def __init__(self, box: Box, clock: Clock, interval: float = 0.2) -> None:
        self.box = box
        self.clock = clock
        self.interval = interval
        self.samples: list[Sample] = []
        self.peak_rss = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> list[Sample]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.samples

    async def _run(self) -> None:
        n = 0
        while True:
            started = time.monotonic()
            self.samples.append(await self.sample())
            n += 1
            if n % 5 == 0:
                await self.box.pids()
            await asyncio.sleep(max(0.02, self.interval - (time.monotonic() - started)))

    async def sample(self) -> Sample:
        t = self.clock()
        rss = self.box.rss()
        self.peak_rss = max(self.peak_rss, rss or 0)
        status = await self.box.status()
        if status is None:
            return Sample(t=t, rss=rss)
        insts = status["instances"]
        return Sample(
            t=t,
            states={i["name"]: str(i.get("state", "")) for i in insts},
            inflight={i["name"]: int(i.get("inflight_total", 0)) for i in insts},
            bindings={i["name"]: sum((i.get("reasons") or {}).values()) for i in insts},
            slots={i["name"]: int(i.get("slots", 0)) for i in insts},
            queued=int(status.get("queued", 0)),
            rss=rss,
        )
