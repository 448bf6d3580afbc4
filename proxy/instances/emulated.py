"""The `emulated` launcher: one `ollamux emulate` child process per emulated instance."""

from __future__ import annotations

import sys
from pathlib import Path

from proxy.config import Config, InstanceConfig, emulated_gpus
from proxy.errors import LaunchError
from proxy.instances.supervisor import ChildSpec
from proxy.logs import current_format
from proxy.units import format_bytes

__all__ = ["emulated_child"]


def emulated_child(config: Config, instance: InstanceConfig) -> ChildSpec:
    """The command line that runs ``instance`` as an emulated Ollama on its loopback port."""
    if not config.source:
        raise LaunchError(
            f"instance {instance.name}: the emulated launcher needs a config file to hand to its "
            "children; load the config with load_config(path)"
        )
    argv = (
        sys.executable,
        "-m",
        "proxy",
        "emulate",
        # the proxy logs every request it routes; the emulators' own access lines would repeat
        # them and add a line for every health check
        "--quiet",
        "--config",
        str(Path(config.source).resolve()),
        "--instance",
        instance.name,
        "--listen",
        f"127.0.0.1:{instance.port}",
        "--log-format",  # its lines go out through serve's output, in serve's format
        current_format(),
    )
    gpus = emulated_gpus(config, instance)
    shown = ", ".join(f"{g.name} ({format_bytes(g.memory_bytes)})" for g in gpus)
    return ChildSpec(
        name=instance.name,
        argv=argv,
        health_url=f"http://127.0.0.1:{instance.port}/",
        # Unbuffered, so its log lines reach the supervisor as they are written.
        env={**instance.env, "PYTHONUNBUFFERED": "1"},
        label=f"emulated GPU{'s' if len(gpus) > 1 else ''} {shown}",
    )
