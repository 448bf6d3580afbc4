"""Helpers for tests that start real processes and servers: free ports, live pids, `ollamux`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

Spawn = Callable[..., tuple["subprocess.Popen[str]", Path]]
"""``spawn(*args)``: `ollamux ARGS` started in the background; returns it and its log file."""


def ollamux_env() -> dict[str, str]:
    """The environment `python -m proxy` runs in from this checkout."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def ollamux(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`ollamux ARGS` from this checkout, run to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        env=ollamux_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def spawner(logs: Path) -> Iterator[Spawn]:
    """A ``spawn`` whose processes write to files in ``logs`` and are killed when it closes."""
    started: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> tuple[subprocess.Popen[str], Path]:
        log = logs / f"ollamux-{len(started)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *args],
                cwd=REPO,
                env=ollamux_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        started.append(proc)
        return proc, log

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def parent_pids() -> dict[int, int]:
    """Every process's parent, read from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def children_of(pid: int) -> set[int]:
    """The processes ``pid`` started itself."""
    return {child for child, parent in parent_pids().items() if parent == pid}


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    parents = parent_pids()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
