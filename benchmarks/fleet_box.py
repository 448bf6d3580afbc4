"""Starts and stops one differing fleet: three emulated Ollama servers behind `ollamux serve`.

Every process runs ``python -m proxy`` from one source tree (a :class:`Code`), so the same
harness measures an export of an old commit and the working tree. The servers each keep their
own in-memory store with the emulator's catalogue; :data:`SINGLE` is deleted from all but the
last one through their own ``DELETE /api/delete`` before the proxy starts, so only that one
holds it (the last, so that a proxy sending passthrough requests to the first instance misses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.procs import Child, free_port, wait_http

SHARED = "llama3.2:3b"
"""Held by every server."""
SINGLE = "llama3.2:1b"
"""Held by the last server only."""
ONE_MODEL = "llama3.1:8b"
"""The one-model run's model, held by every server."""
SERVERS = 3
SLOTS = 2


@dataclass(frozen=True)
class Code:
    """A source tree whose ``proxy`` package every child runs."""

    label: str
    src: Path
    rev: str = ""

    def env(self) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1"}

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``python ARGS`` with this tree first on the path (cwd and PYTHONPATH)."""
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.src,
            env={**os.environ, **self.env(), "PYTHONPATH": str(self.src)},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def package_file(self) -> str:
        """Where ``import proxy`` finds the package: proof the intended tree runs."""
        done = self.run("-c", "import proxy; print(proxy.__file__)")
        return done.stdout.strip() or done.stderr.strip()[-300:]


def export(repo: Path, rev: str, dest: Path) -> Code:
    """``git archive REV`` of ``repo`` unpacked into ``dest`` (the checkout is not touched)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return Code(label="before", src=dest, rev=rev)


def config_text(proxy_port: int, urls: list[str], *, gpu_source: bool) -> str:
    lines = [f"listen: 127.0.0.1:{proxy_port}", "instances:"]
    for i, url in enumerate(urls):
        lines += [
            f"  - name: b{i}",
            "    launcher: external",
            f"    url: {url}",
            f"    num_parallel: {SLOTS}",
        ]
        if gpu_source:
            lines.append(f"    gpu_source: {url}")
    return "\n".join(lines) + "\n"


def knows_gpu_source(code: Code, workdir: Path) -> bool:
    """Whether this tree's ``config check`` accepts ``gpu_source`` (older ones refuse the key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / "probe.yaml"
    for gpu_source in (True, False):
        probe.write_text(config_text(free_port(), ["http://127.0.0.1:9"], gpu_source=gpu_source))
        done = code.run("-m", "proxy", "config", "check", str(probe))
        if done.returncode == 0:
            return gpu_source
    raise RuntimeError(f"{code.src}: config check refuses the fleet's config:\n{done.stderr}")


@dataclass(kw_only=True)
class Fleet:
    """A running fleet; ``recent`` collects the proxy's ``/proxy/status`` records by request id."""

    code: Code
    url: str
    backends: list[str]
    gpu_source: bool
    children: list[Child] = field(default_factory=list)
    recent: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    ready_s: float = 0.0
    stale_on: str = "-"
    """The server a model was deleted from behind the proxy's back, if any."""

    async def poll(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + "/proxy/status") as resp:
            doc: dict[str, Any] = await resp.json()
        for rec in doc.get("recent", ()):
            self.recent[rec["request_id"]] = rec
        self.status = doc
        return doc

    async def watch(self, session: aiohttp.ClientSession, every: float = 0.1) -> None:
        """Poll until cancelled, so that no record falls out of the 20-entry ``recent``."""
        while True:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                await self.poll(session)
            await asyncio.sleep(every)

    async def backend_ps(self, session: aiohttp.ClientSession) -> list[list[str]]:
        """The models each server has loaded, asked of the servers themselves."""
        out = []
        for url in self.backends:
            async with session.get(url + "/api/ps") as resp:
                out.append(sorted(m["name"] for m in (await resp.json()).get("models", [])))
        return out

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


async def start_fleet(code: Code, workdir: Path, *, speed: float, gpu_source: bool) -> Fleet:
    """Three servers (one without :data:`SINGLE` each but the last), then the proxy, all ready."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(SERVERS)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    fleet = Fleet(code=code, url="", backends=urls, gpu_source=gpu_source)
    try:
        for i, port in enumerate(ports):
            argv = [sys.executable, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{port}",
                    "--gpu", f"rtx4090-{i}:24", "--speed", f"{speed:g}",
                    "--num-parallel", str(SLOTS), "--seed", str(i), "--quiet"]  # fmt: skip
            fleet.children.append(
                Child(f"server b{i}", argv, log=workdir / f"b{i}.log", env=code.env(), cwd=code.src)
            )
        for child, url in zip(fleet.children, urls, strict=True):
            await wait_http(url + "/api/tags", child=child, timeout=30, expect=SINGLE)
        async with aiohttp.ClientSession() as session:
            for url in urls[:-1]:
                async with session.delete(url + "/api/delete", json={"model": SINGLE}) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"DELETE {SINGLE} on {url}: {resp.status}")
        proxy_port = free_port()
        fleet.url = f"http://127.0.0.1:{proxy_port}"
        config = workdir / "fleet.yaml"
        config.write_text(config_text(proxy_port, urls, gpu_source=gpu_source))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
        serve = Child(
            "ollamux serve", argv, log=workdir / "serve.log", env=code.env(), cwd=code.src
        )
        fleet.children.append(serve)
        await wait_http(fleet.url + "/api/tags", child=serve, timeout=30, expect=SINGLE)
        await _wait_healthy(fleet, serve)
    except BaseException:
        fleet.stop()
        raise
    fleet.ready_s = round(time.monotonic() - started, 2)
    return fleet


async def _wait_healthy(fleet: Fleet, serve: Child, timeout: float = 20.0) -> None:
    """Every instance healthy (and, with ``gpu_source``, its memory known)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            doc = await fleet.poll(session)
            insts = doc.get("instances", [])
            ok = len(insts) == SERVERS and all(i.get("healthy") for i in insts)
            if fleet.gpu_source:
                ok = ok and all(i.get("memory_total") for i in insts)
            if ok:
                return
            if not serve.alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    "the proxy's instances did not all become ready: "
                    f"{json.dumps(insts)[:800]}\n{serve.tail()}"
                )
            await asyncio.sleep(0.1)
