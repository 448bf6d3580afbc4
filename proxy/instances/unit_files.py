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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from proxy import __version__
from proxy.config import Config, InstanceConfig, parse_listen
from proxy.config_dump import config_tree, plain
from proxy.errors import ConfigError
from proxy.instances.hardening import HOME_DIRS, ollama_sandbox, proxy_sandbox
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
    "Account",
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


@dataclass(frozen=True, kw_only=True)
class Account:
    """Who the units run as, and the environment of the proxy beyond its config."""

    user: str = USER
    group: str = USER
    home: str = OLLAMA_HOME
    """The user's home: Ollama keeps its key (and by default the models) in ``~/.ollama``."""
    proxy_env: Mapping[str, str] = field(default_factory=dict)
    """Set in ``ollamux.service`` (e.g. OLLAMA_ORIGINS carried over from the stock unit)."""


def instance_unit(name: str) -> str:
    """The systemd unit of instance ``name``: ``ollama@NAME.service``."""
    return f"ollama@{name}.service"


def local_instances(config: Config) -> list[InstanceConfig]:
    """The instances that become ``ollama@`` units: those with launcher process or systemd."""
    if config.instances == "auto":
        raise ConfigError("instances: auto must be pinned to this host's GPUs", path="instances")
    return [inst for inst in config.instances if inst.launcher in LOCAL]


def render(
    config: Config, *, ollama: str, ollamux: Sequence[str], account: Account | None = None
) -> list[UnitFile]:
    """Every file for ``config``; ``ollama`` and ``ollamux`` are absolute executable paths."""
    account = account or Account()
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
        UnitFile(path=f"{UNIT_DIR}/{TEMPLATE}", text=_template(config, ollama, account)),
        UnitFile(
            path=f"{UNIT_DIR}/{PROXY_UNIT}", text=_proxy_unit(config, ollamux, units, account)
        ),
        UnitFile(path=f"{UNIT_DIR}/{TARGET}", text=_target(config, units)),
    ]
    for inst in instances:
        files.append(
            UnitFile(path=f"{ENV_DIR}/{inst.name}.env", text=_env_file(config, inst), mode=0o600)
        )
    files.append(
        UnitFile(path=PROXY_CONFIG, text=_proxy_config(config), mode=0o640, group=account.group)
    )
    files.append(UnitFile(path=POLKIT_RULE, text=_polkit_rule(account.user)))
    return files


# --- the files -----------------------------------------------------------------------------------


def _header(config: Config) -> str:
    source = f" from {config.source}" if config.source else ""
    return (
        f"# Rendered by ollamux {__version__}{source}; `ollamux systemd install` installs it.\n"
        "# Change the config and install again rather than editing this file.\n"
    )


def _template(config: Config, ollama: str, account: Account) -> str:
    writable = [account.home]  # prefixed "-" there: no error where it does not exist
    store = models_dir(config)
    if store and not any(store == w or store.startswith(w.rstrip("/") + "/") for w in writable):
        writable.append(store)
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
User={account.user}
Group={account.group}
Restart=always
RestartSec=3

{ollama_sandbox(writable)}"""


def _proxy_unit(config: Config, ollamux: Sequence[str], units: list[str], account: Account) -> str:
    command = " ".join(_quote(part) for part in ollamux)
    _, port = parse_listen(config.listen)
    environment = "".join(
        f"Environment={_env_word(key, value)}\n" for key, value in account.proxy_env.items()
    )
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
{environment}User={account.user}
Group={account.group}
Restart=on-failure
RestartSec=3

# Stopping drains: SIGTERM goes to the proxy alone (KillMode=mixed); it refuses new requests and
# lets those in flight finish for up to timeouts.drain ({_seconds(config.timeouts.drain)} s) \
before it stops what it
# launched. The ollama@ units stop after it, in the reverse order of After=.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout(config)}

{proxy_sandbox(port=port, home_files=_names_home_files(config))}"""


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
    tree = config_tree(dataclasses.replace(config, instances=instances))
    del tree["ollama_binary"]
    if not any(inst.launcher == "emulated" for inst in instances):
        del tree["emulator"]
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=100)
    return (
        _header(config)
        + "# The proxy's config: its instances are the ollama@ units (launcher systemd), which it\n"
        + "# connects to and restarts with systemctl, but does not start itself.\n"
        + text
    )


def _names_home_files(config: Config) -> bool:
    """Whether a value of the proxy's config is a path under a home directory (ProtectHome)."""

    def walk(value: Any) -> bool:
        if isinstance(value, dict):
            return any(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(walk(v) for v in value)
        return isinstance(value, str) and (
            value.startswith("~") or any(value.startswith(d + "/") for d in HOME_DIRS)
        )

    tree = plain(config)
    for key in ("source", "models_dir", "ollama_binary"):  # not read by the proxy under systemd
        tree.pop(key, None)
    return walk(tree)


def _polkit_rule(user: str) -> str:
    return f"""// Rendered by ollamux {__version__}; `ollamux systemd install` installs it.
// Lets the proxy (user {user}) restart its instances, and only those: the admin API's
// POST /proxy/instances/NAME/restart runs `systemctl restart ollama@NAME.service`.
polkit.addRule(function(action, subject) {{
    if (action.id == "org.freedesktop.systemd1.manage-units" &&
        subject.user == "{user}" &&
        action.lookup("verb") == "restart" &&
        /^ollama@[A-Za-z0-9_.-]+\\.service$/.test(action.lookup("unit"))) {{
        return polkit.Result.YES;
    }}
}});
"""


def _env_word(key: str, value: str) -> str:
    """``"KEY=VALUE"`` for Environment=: quoted, with ``%`` (a specifier) doubled."""
    text = f"{key}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{text}"'


def _quote(word: str) -> str:
    """A word of a unit's command line or path list, quoted when it holds spaces or quotes."""
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
