"""systemd units for a config, as text: a template unit for the GPU servers, the proxy, a target.

:func:`render` is pure: from a config whose GPUs are pinned (see :mod:`proxy.instances.pinning`)
and the paths of the two executables it returns every file with its place on the target system:

- ``ollama@.service``: one Ollama server per instance (``ollama@gpu0.service``), reading
  ``/etc/ollamux/instances/%i.env``;
- one such env file per instance: exactly the environment the ``process`` launcher gives it;
- ``ollamux.service``: the proxy, ordered after and wanting every instance; it reads
  ``/etc/ollamux/ollamux.yaml``, the config with those instances as ``launcher: systemd``
  (connect, don't spawn);
- ``ollamux.target``: all of them, enabled at boot;
- a polkit rule letting the proxy's user ``systemctl restart ollama@NAME`` (the admin restart).

Writing the files and calling systemctl is :mod:`proxy.instances.systemctl`'s job.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from proxy import __version__
from proxy.config import Config, InstanceConfig
from proxy.config_dump import plain
from proxy.errors import ConfigError
from proxy.instances.pinning import LOCAL
from proxy.instances.process import instance_env, models_dir
from proxy.instances.supervisor import RestartPolicy

__all__ = [
    "ENV_DIR",
    "ETC_DIR",
    "OLLAMA_HOME",
    "PROXY_CONFIG",
    "PROXY_UNIT",
    "TARGET",
    "UNIT_DIR",
    "USER",
    "UnitFile",
    "instance_unit",
    "local_instances",
    "render",
    "stop_timeout",
]

UNIT_DIR = "/etc/systemd/system"
ETC_DIR = "/etc/ollamux"
ENV_DIR = f"{ETC_DIR}/instances"
PROXY_CONFIG = f"{ETC_DIR}/ollamux.yaml"
POLKIT_RULE = "/etc/polkit-1/rules.d/50-ollamux.rules"
TEMPLATE = "ollama@.service"
PROXY_UNIT = "ollamux.service"
TARGET = "ollamux.target"
USER = "ollama"
"""The user Ollama's installer creates; both the servers and the proxy run as it."""
OLLAMA_HOME = "/usr/share/ollama"
"""The ``ollama`` user's home: its key and, unless models_dir says otherwise, the model store."""

_INSTANCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True, kw_only=True)
class UnitFile:
    """One rendered file: where it goes on the target system, its text and its mode."""

    path: str
    text: str
    mode: int = 0o644
    group: str = ""
    """Group that must be able to read it (mode 0640), e.g. the proxy's user's group."""


def instance_unit(name: str) -> str:
    """The systemd unit of instance ``name``: ``ollama@NAME.service``."""
    return f"ollama@{name}.service"


def local_instances(config: Config) -> list[InstanceConfig]:
    """The instances that become ``ollama@`` units: those with launcher process or systemd."""
    if config.instances == "auto":
        raise ConfigError("instances: auto must be pinned to this host's GPUs", path="instances")
    return [inst for inst in config.instances if inst.launcher in LOCAL]


def render(config: Config, *, ollama: str, ollamux: Sequence[str]) -> list[UnitFile]:
    """Every file for ``config``; ``ollama`` and ``ollamux`` are absolute executable paths."""
    instances = local_instances(config)
    if not instances:
        raise ConfigError(
            "has no instance with launcher process or systemd, so no ollama@ unit to render",
            source=config.source,
            path="instances",
        )
    for i, inst in enumerate(config.instances):
        if inst in instances and not _INSTANCE_NAME.match(inst.name):
            raise ConfigError(
                f"{inst.name!r} cannot name a systemd unit; use letters, digits, '.', '_' and '-'",
                source=config.source,
                path=f"instances[{i}].name",
            )
    units = [instance_unit(inst.name) for inst in instances]
    files = [
        UnitFile(path=f"{UNIT_DIR}/{TEMPLATE}", text=_template(config, ollama)),
        UnitFile(path=f"{UNIT_DIR}/{PROXY_UNIT}", text=_proxy_unit(config, ollamux, units)),
        UnitFile(path=f"{UNIT_DIR}/{TARGET}", text=_target(config, units)),
    ]
    for inst in instances:
        files.append(
            UnitFile(path=f"{ENV_DIR}/{inst.name}.env", text=_env_file(config, inst), mode=0o600)
        )
    files.append(UnitFile(path=PROXY_CONFIG, text=_proxy_config(config), mode=0o640, group=USER))
    files.append(UnitFile(path=POLKIT_RULE, text=_polkit_rule()))
    return files


# --- the files -----------------------------------------------------------------------------------


def _header(config: Config) -> str:
    source = f" from {config.source}" if config.source else ""
    return (
        f"# Rendered by ollamux {__version__}{source}; `ollamux systemd install` installs it.\n"
        "# Change the config and install again rather than editing this file.\n"
    )


def _template(config: Config, ollama: str) -> str:
    writable = [f"-{OLLAMA_HOME}"]  # "-": no error where it does not exist
    if config.models_dir:
        writable.append(_quote(f"-{models_dir(config)}"))
    return f"""{_header(config)}\
# One Ollama server per instance: ollama@NAME.service reads {ENV_DIR}/NAME.env
# (CUDA_VISIBLE_DEVICES=<its GPU UUID>, OLLAMA_HOST=127.0.0.1:<its port>, its OLLAMA_* settings).

[Unit]
Description=Ollama server %i (an ollamux instance)
Documentation=https://github.com/ollama/ollama/blob/main/docs/linux.md
After=network-online.target
Wants=network-online.target
PartOf={TARGET}

[Service]
Type=exec
ExecStart={_quote(ollama)} serve
EnvironmentFile={ENV_DIR}/%i.env
User={USER}
Group={USER}
Restart=always
RestartSec=3

# Hardening that Ollama tolerates. Left out on purpose: PrivateDevices= and ProtectClock= (both
# restrict /dev, hiding the GPUs), NoNewPrivileges= and ProtectKernelModules= (CUDA may load
# nvidia-uvm through the setuid nvidia-modprobe), MemoryDenyWriteExecute= (CUDA compiles kernels
# at run time), ProtectHome= (models_dir may live under /home).
ProtectSystem=full
ReadWritePaths={" ".join(writable)}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
"""


def _proxy_unit(config: Config, ollamux: Sequence[str], units: list[str]) -> str:
    command = " ".join(_quote(part) for part in ollamux)
    return f"""{_header(config)}\
# The ollamux proxy: it connects to the instances systemd runs (launcher systemd), routes
# requests to them, and restarts one on request with `systemctl restart ollama@NAME`.

[Unit]
Description=ollamux: load-balancing proxy in front of one Ollama server per GPU
After=network-online.target {" ".join(units)}
Wants=network-online.target {" ".join(units)}
PartOf={TARGET}

[Service]
Type=exec
ExecStart={command} serve --config {PROXY_CONFIG}
Environment=PYTHONUNBUFFERED=1
User={USER}
Group={USER}
Restart=on-failure
RestartSec=3

# Stopping drains: SIGTERM goes to the proxy alone (KillMode=mixed); it refuses new requests and
# lets those in flight finish for up to timeouts.drain ({_seconds(config.timeouts.drain)} s) \
before it stops what it
# launched. The ollama@ units stop after it, in the reverse order of After=.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout(config)}

# The proxy only reads files, speaks HTTP, reads NVML (/dev/nvidia*) and talks to systemd.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
"""


def stop_timeout(config: Config) -> int:
    """``TimeoutStopSec`` of the proxy: its drain, then its own instances' stop, with a margin."""
    instances_stop = RestartPolicy().stop_timeout  # SIGTERM, then SIGKILL after this long
    return math.ceil(config.timeouts.drain + instances_stop + _STOP_MARGIN)


_STOP_MARGIN = 10.0
"""Seconds for the last writes to clients, the instances' own exit and Python's."""


def _seconds(value: float) -> str:
    return f"{value:g}"


def _target(config: Config, units: list[str]) -> str:
    return f"""{_header(config)}
[Unit]
Description=ollamux: one Ollama server per GPU and the proxy in front of them
Wants={PROXY_UNIT} {" ".join(units)}

[Install]
WantedBy=multi-user.target
"""


def _env_file(config: Config, instance: InstanceConfig) -> str:
    lines = [
        _header(config).rstrip("\n"),
        f"# The environment of {instance_unit(instance.name)}.",
    ]
    index = config.instances.index(instance) if config.instances != "auto" else 0
    for key, value in instance_env(config, instance).items():
        if "\n" in value or "\r" in value:
            raise ConfigError(
                "must be one line (it goes into a systemd EnvironmentFile)",
                source=config.source,
                path=f"instances[{index}].env.{key}",
            )
        escaped = "".join("\\" + c if c in '"\\`$' else c for c in value)
        lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"


def _proxy_config(config: Config) -> str:
    assert config.instances != "auto"
    instances = tuple(
        dataclasses.replace(inst, launcher="systemd") if inst.launcher in LOCAL else inst
        for inst in config.instances
    )
    tree = plain(dataclasses.replace(config, instances=instances))
    del tree["source"], tree["ollama_binary"]
    if not any(inst.launcher == "emulated" for inst in instances):
        del tree["emulator"]
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=100)
    return (
        _header(config)
        + "# The proxy's config: its instances are the ollama@ units (launcher systemd), which it\n"
        + "# connects to and restarts with systemctl, but does not start itself.\n"
        + text
    )


def _polkit_rule() -> str:
    return f"""// Rendered by ollamux {__version__}; `ollamux systemd install` installs it.
// Lets the proxy (user {USER}) restart its instances, and only those: the admin API's
// POST /proxy/instances/NAME/restart runs `systemctl restart ollama@NAME.service`.
polkit.addRule(function(action, subject) {{
    if (action.id == "org.freedesktop.systemd1.manage-units" &&
        subject.user == "{USER}" &&
        action.lookup("verb") == "restart" &&
        /^ollama@[A-Za-z0-9_.-]+\\.service$/.test(action.lookup("unit"))) {{
        return polkit.Result.YES;
    }}
}});
"""


def _quote(word: str) -> str:
    """A word of a unit's command line or path list, quoted when it holds spaces or quotes."""
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
