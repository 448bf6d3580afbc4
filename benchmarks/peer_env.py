"""Where the routing benchmark's outside peers live: pinned PyPI installs in their own virtual
environments (outside the checkout, never project dependencies), and the loopback-only network
namespace some of them must run in.

A peer is installed once into ``${XDG_CACHE_HOME:-~/.cache}/ollamux-bench/<name>-<version>`` and
reused while its ``.complete`` marker is there. ``Unavailable`` carries the printed reason when it
cannot be installed or confined, so the benchmark skips that contender instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LITELLM_STRATEGIES = {"litellm_least_busy": "least-busy", "litellm_shuffle": "simple-shuffle"}
"""LiteLLM contenders and the ``routing_strategy`` each runs with (``simple-shuffle`` is its
default)."""
HERD_NAME = "herd"
PEERS = (*LITELLM_STRATEGIES, HERD_NAME)
MUST_CONFINE = (HERD_NAME,)
"""Peers that advertise themselves on the network (mDNS, a listener on the LAN address) and send
telemetry by default: they run only in a loopback-only namespace, or not at all."""
NETNS_ENV = "OLLAMUX_BENCH_NETNS"
"""Set (to 1) in the benchmark process that runs inside its own loopback-only namespace."""
INSTALL_TIMEOUT_S = 900.0


class Unavailable(Exception):
    """A peer that cannot be installed or run here; its message says why and what to do."""


@dataclass(frozen=True)
class Peer:
    """A pinned PyPI distribution and the console scripts the benchmark runs from it."""

    name: str
    requirement: str
    """What pip installs, pinned (``pkg[extra]==version``)."""
    version: str
    scripts: tuple[str, ...]


LITELLM = Peer(
    name="litellm",
    requirement="litellm[proxy]==1.106.12",
    version="1.106.12",
    scripts=("litellm",),
)
HERD = Peer(
    name="ollama-herd",
    requirement="ollama-herd==0.11.4",
    version="0.11.4",
    scripts=("herd", "herd-node"),
)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ollamux-bench"


def venv_dir(peer: Peer) -> Path:
    return cache_root() / f"{peer.name}-{peer.version}"


def script(peer: Peer, name: str) -> str:
    return str(venv_dir(peer) / "bin" / name)


def ensure_installed(peer: Peer, *, log: Path | None = None) -> Path:
    """The peer's virtual environment, installed now unless a complete one is there already."""
    home = venv_dir(peer)
    marker = home / ".complete"
    if marker.exists() and all((home / "bin" / s).exists() for s in peer.scripts):
        return home
    if home.exists():
        shutil.rmtree(home)  # a half-done install from an interrupted run
    home.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing {peer.requirement} into {home} (once)", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(home)],
        [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", peer.requirement],
    ]
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        for argv in steps:
            done = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                detail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
                where = f" (see {log})" if log is not None else ""
                raise Unavailable(
                    f"cannot install {peer.requirement}: `{' '.join(argv[-3:])}` exited "
                    f"{done.returncode}{where} {' '.join(detail)}".strip()
                )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"cannot install {peer.requirement}: {exc}") from exc
    finally:
        if log is not None and not isinstance(out, int):
            out.close()
    missing = [s for s in peer.scripts if not (home / "bin" / s).exists()]
    if missing:
        raise Unavailable(f"{peer.requirement} installed no {', '.join(missing)} script")
    marker.write_text(peer.requirement + "\n", encoding="utf-8")
    return home


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace (/proc/self/net/dev; /sys/class/net
    shows the namespace sysfs was mounted in, not this one)."""
    try:
        lines = Path("/proc/self/net/dev").read_text(encoding="ascii").splitlines()[2:]
    except OSError:
        return []
    return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)


def inside_loopback_namespace() -> bool:
    """True when this process's network namespace has no interface but ``lo``."""
    return interfaces() == ["lo"]


def confined_argv(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace with only ``lo`` (up): nothing it sends or
    advertises leaves the namespace. Unavailable when the namespace cannot be made here."""
    unshare = shutil.which("unshare")
    ip = shutil.which("ip")
    if unshare is None or ip is None:
        raise Unavailable("needs `unshare` (util-linux) and `ip` (iproute2) for a loopback-only "
                          "network namespace")  # fmt: skip
    probe = subprocess.run(
        [unshare, "--net", "--", ip, "link", "set", "lo", "up"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise Unavailable(
            "cannot make a loopback-only network namespace (`unshare --net` needs root or "
            f"CAP_SYS_ADMIN): {probe.stderr.strip()[:200]}"
        )
    return [unshare, "--net", "--", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh", *argv]


def prepare(contenders: list[str], *, log: Path | None = None) -> list[str]:
    """``contenders`` less the peers that cannot be installed or confined here (each skipped
    with its reason printed); the others' environments are installed now, before any round."""
    kept = []
    for name in contenders:
        if name in PEERS:
            try:
                ensure_installed(HERD if name == HERD_NAME else LITELLM, log=log)
                if name in MUST_CONFINE and not inside_loopback_namespace():
                    confined_argv([])
            except Unavailable as exc:
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
        kept.append(name)
    return kept
