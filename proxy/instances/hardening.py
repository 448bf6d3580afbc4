"""The sandbox of the rendered units: every directive, with a comment saying why or what it breaks.

:func:`ollama_sandbox` is the ``[Service]`` tail of ``ollama@.service``, :func:`proxy_sandbox`
that of ``ollamux.service``. Both are scored by ``systemd-analyze security`` in the tests, which
fail above a threshold, so a directive dropped here shows up there.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["HOME_DIRS", "NVIDIA_MODPROBE", "ollama_sandbox", "proxy_sandbox", "under_home"]

HOME_DIRS = ("/home", "/root", "/run/user")
"""What ProtectHome= hides."""
NVIDIA_MODPROBE = "/usr/bin/nvidia-modprobe"

_KERNEL = (
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
)
"""Both units: no kernel tunables, modules, logs, cgroups, clock or host name to change."""
_RESTRICTED = (
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
)
"""Both units: no namespaces, realtime scheduling, setuid files or personality changes."""


def under_home(path: str) -> bool:
    """Whether ProtectHome= would hide ``path``."""
    return any(path == d or path.startswith(d + "/") for d in HOME_DIRS)


def ollama_sandbox(writable: Sequence[str]) -> str:
    """Hardening of an Ollama server that writes ``writable`` (its home, the model store)."""
    homes = [p for p in writable if under_home(p)]
    others = [p for p in writable if not under_home(p)]
    lines = [
        "# Sandbox. Scored by `systemd-analyze security`; each line says why or what it costs.",
        "# The setuid nvidia-modprobe cannot run under NoNewPrivileges=, so load nvidia-uvm first,",
        '# as root and outside the sandbox ("+"); "-": no error on hosts without it.',
        f"ExecStartPre=-+{NVIDIA_MODPROBE} -u -c 0",
        "# No setuid binaries: CUDA can no longer create missing /dev/nvidia* nodes on demand (the",
        "# line above does for UVM; MIG's /dev/nvidia-caps nodes must exist before it starts).",
        "NoNewPrivileges=yes",
        "# The whole file system read-only, but for Ollama's home (its key) and the model store.",
        "ProtectSystem=strict",
    ]
    if others:
        lines.append(f"ReadWritePaths={' '.join(_word('-' + p) for p in others)}")
    if homes:
        lines += [
            "# The model store or Ollama's home lies under /home: hide the other homes (empty,",
            "# read-only tmpfs) and bind just these back, writable.",
            "ProtectHome=tmpfs",
            f"BindPaths={' '.join(_word('-' + p) for p in homes)}",
        ]
    else:
        lines += ["# Nothing it needs lies under /home, /root or /run/user.", "ProtectHome=yes"]
    lines += [
        "# Its own /tmp (runners unpack there), not the host's.",
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "# The GPUs: /dev stays the host's (PrivateDevices=yes would hide /dev/nvidia*), but only",
        "# the NVIDIA character devices (nvidiactl, nvidiaN, nvidia-uvm, nvidia-modeset and",
        "# nvidia-caps for MIG) and the standard pseudo devices may be opened. AMD GPUs would",
        "# need DeviceAllow=/dev/kfd rw and DeviceAllow=char-drm rw in a drop-in.",
        "PrivateDevices=no",
        "DevicePolicy=closed",
        "DeviceAllow=char-nvidia* rw",
        *_KERNEL,
        "# Other users' processes are invisible. ProcSubset=pid is left out: Ollama reads",
        "# /proc/meminfo and /proc/cpuinfo, and NVIDIA's libraries /proc/driver/nvidia.",
        "ProtectProc=invisible",
        *_RESTRICTED,
        "# MemoryDenyWriteExecute= is left out: CUDA compiles kernels at run time (PTX JIT) and",
        "# the GGML backends map code, both need memory that is writable and executable.",
        "# HTTP (inet), local sockets (unix) and netlink: Go lists the interface addresses",
        "# through it for Ollama's Host check.",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "# The system calls of an ordinary service; @resources stays allowed (CUDA and GGML pin",
        "# memory and threads: mbind, set_mempolicy, sched_setaffinity). A refused call fails",
        "# with EPERM instead of killing the server.",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "SystemCallArchitectures=native",
        "# No capabilities at all: it binds an unprivileged loopback port.",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "# Models and keys it writes: its group (the installer adds you to it) may read them.",
        "UMask=0027",
        "# Left out: PrivateUsers= (device nodes owned by the video/render groups would be",
        "# unreachable), PrivateNetwork=/IPAddressDeny= (it pulls models from the registry),",
        "# RemoveIPC= (the instances share the user; one stopping would remove another's IPC).",
    ]
    return "\n".join(lines) + "\n"


def proxy_sandbox(*, port: int, home_files: bool) -> str:
    """Hardening of the proxy on ``port``; ``home_files``: its config names a path in a home."""
    lines = [
        "# Sandbox. Scored by `systemd-analyze security`; each line says why or what it costs.",
        "# The proxy only reads files, speaks HTTP, reads NVML (/dev/nvidia*) and asks systemd",
        "# (D-Bus, polkit) to restart an instance.",
        "NoNewPrivileges=yes",
        "# It writes nothing: the whole file system is read-only.",
        "ProtectSystem=strict",
    ]
    if home_files:
        lines += [
            "# Its config names a file under a home directory: readable.",
            "ProtectHome=read-only",
        ]
    else:
        lines += ["# Its config names no file under /home, /root or /run/user.", "ProtectHome=yes"]
    lines += [
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "# NVML needs the NVIDIA devices (GPU memory and processes for the router), so /dev stays",
        "# the host's (PrivateDevices=yes would hide them) but only those may be opened.",
        "PrivateDevices=no",
        "DevicePolicy=closed",
        "DeviceAllow=char-nvidia* rw",
        *_KERNEL,
        "# ProcSubset=pid is left out: NVML reads /proc/driver/nvidia.",
        "ProtectProc=invisible",
        *_RESTRICTED,
        "# CPython 3.11 has no JIT, and NVML is called through ctypes without callbacks (no",
        "# libffi closures), so no memory need be writable and executable.",
        "MemoryDenyWriteExecute=yes",
        "# HTTP (inet), D-Bus to systemd (unix), interface addresses for the Host check (netlink).",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "# The system calls of an ordinary service, less the privileged and resource-changing",
        "# ones; a refused call fails with EPERM instead of killing the proxy.",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "SystemCallErrorNumber=EPERM",
        "SystemCallArchitectures=native",
    ]
    if port < 1024:
        lines += [
            f"# It listens on port {port}, below 1024: that one capability, nothing else.",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        ]
    else:
        lines += [
            "# No capabilities at all: its port is unprivileged.",
            "CapabilityBoundingSet=",
            "AmbientCapabilities=",
        ]
    lines += [
        "# It creates no file that anyone else reads.",
        "UMask=0077",
        "# Left out: PrivateUsers= (systemctl's polkit check and the device nodes' groups),",
        "# PrivateNetwork=/IPAddressDeny= (clients and external instances anywhere).",
    ]
    return "\n".join(lines) + "\n"


def _word(word: str) -> str:
    """A path of a unit's path list, quoted when it holds spaces or quotes."""
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
