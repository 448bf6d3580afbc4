"""Is a TCP port free, and if not, who holds it (best effort, from /proc on Linux).

Checked before anything starts, so a stray ``ollama serve`` on an instance's port is named with its
pid and command line instead of surfacing as an instance that "crashed" on start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

__all__ = ["foreign_listener", "holder", "port_problem"]

_LISTEN = "0A"
"""TCP_LISTEN in /proc/net/tcp's ``st`` column."""


def port_problem(host: str, port: int) -> str:
    """Empty when ``host:port`` can be listened on; else why not, naming the holder if visible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers (Go's net.Listen, aiohttp) do, so a socket in TIME_WAIT does not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
            return f"port {port} is already in use by {holder(port)}"
    return ""


def holder(port: int, proc: Path = Path("/proc")) -> str:
    """``pid 1234 (ollama serve)`` for the process listening on ``port``, or what is known."""
    inodes = _listening_inodes(port, proc)
    if not inodes:
        return f"another process (see: ss -ltnp 'sport = :{port}')"
    for pid_dir in proc.iterdir():
        if pid_dir.name.isdigit() and _holds(pid_dir, inodes):
            return f"pid {pid_dir.name} ({_command(pid_dir)})"
    return f"a process this user cannot see (run as root, or: sudo ss -ltnp 'sport = :{port}')"


def foreign_listener(port: int, group: int, proc: Path = Path("/proc")) -> str:
    """Empty when a process of process group ``group`` listens on ``port``; else who does.

    Tells a child that answers its health check from one that failed to listen while another
    server answers on its port. Empty too where /proc cannot tell (not Linux).
    """
    inodes = _listening_inodes(port, proc)
    if not inodes or _holds(proc / str(group), inodes):  # the group's leader, as a rule
        return ""
    for pid_dir in proc.iterdir():
        if pid_dir.name.isdigit() and _group(pid_dir) == group and _holds(pid_dir, inodes):
            return ""
    return holder(port, proc)


def _holds(pid_dir: Path, inodes: set[str]) -> bool:
    """Whether the process of ``pid_dir`` has one of the sockets ``inodes`` open."""
    try:
        fds = list((pid_dir / "fd").iterdir())
    except OSError:  # another user's process, or gone
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _group(pid_dir: Path) -> int:
    """The process group of the process of ``pid_dir``; -1 if it is gone."""
    try:
        return int((pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return -1


def _listening_inodes(port: int, proc: Path) -> set[str]:
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                found.add(fields[9])
    return found


def _command(pid_dir: Path) -> str:
    try:
        argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        text = " ".join(a.decode(errors="replace") for a in argv if a)
    except OSError:
        text = ""
    if not text:
        with contextlib.suppress(OSError):
            text = (pid_dir / "comm").read_text().strip()
    return text[:120] if len(text) <= 120 else text[:117] + "..."
