"""What the user set in the stock ``ollama.service``, carried over into the rendered units.

:func:`carry_over` reads the stock unit and its drop-ins under a root (``/`` or an image), their
``Environment=``, ``EnvironmentFile=``, ``User=`` and ``Group=``, and returns the config and
:class:`~proxy.instances.unit_files.Account` to render with, and one line per setting saying where
it went or why it could not go anywhere. The ollamux config wins where it already says something.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import Config, InstanceConfig, parse_listen
from proxy.errors import ConfigError
from proxy.instances.unit_files import Account

__all__ = ["Carried", "carry_over", "ollama_host"]

STOCK = "ollama.service"
UNIT_DIRS = (
    "etc/systemd/system",
    "run/systemd/system",
    "usr/local/lib/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
)
DEFAULT_LISTEN = Config().listen
PINNING = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
           "GPU_DEVICE_ORDINAL", "GGML_VK_VISIBLE_DEVICES")  # fmt: skip
_FIELDS: dict[
    str, tuple[str, Callable[[str], object]]
] = {  # instance key, parsed from the variable's text
    "OLLAMA_NUM_PARALLEL": ("num_parallel", int),
    "OLLAMA_KEEP_ALIVE": ("keep_alive", str),
    "OLLAMA_MAX_LOADED_MODELS": ("max_loaded_models", int),
    "OLLAMA_MAX_QUEUE": ("max_queue", int),
    "OLLAMA_CONTEXT_LENGTH": ("context_length", int),
    "OLLAMA_SCHED_SPREAD": ("spread", lambda v: v.lower() not in ("", "0", "false", "f")),
}


@dataclass(frozen=True)
class Carried:
    """The config and account to render with, and what happened to each stock setting."""

    config: Config
    account: Account
    lines: list[str]
    """``NAME=VALUE (file) -> where``, or ``... not carried: why``."""
    warnings: list[str]


def carry_over(config: Config, root: str, account: Account) -> Carried:
    """The settings of the stock unit under ``root`` applied to ``config`` and ``account``."""
    env, user, group, problems = _read_stock(Path(root))
    lines, warnings = list(problems), []
    proxy_env = dict(account.proxy_env)
    assert config.instances != "auto"
    instances = list(config.instances)
    defaults = InstanceConfig(name="x")
    for key, (value, source) in env.items():
        said = f"{key}={value} ({source})"
        if key == "OLLAMA_HOST":
            try:
                listen = ollama_host(value)
            except ValueError as exc:
                lines.append(f"{said} not carried: {exc}")
                continue
            if parse_listen(listen) == parse_listen(DEFAULT_LISTEN):
                lines.append(f"{said} -> listen: already {config.listen}")
            elif config.listen != DEFAULT_LISTEN:
                lines.append(f"{said} not carried: your config sets listen: {config.listen}")
            elif any(i.port == parse_listen(listen)[1] for i in instances if i.port):
                lines.append(f"{said} not carried: an instance has that port; give it another")
            else:
                config = dataclasses.replace(config, listen=listen)
                lines.append(f"{said} -> listen: {listen}")
                warnings.append(
                    f"the proxy will listen on {listen} (OLLAMA_HOST in {source}), where Ollama "
                    "did: anyone who can reach it can use it; consider `ollamux keys add`"
                )
        elif key == "OLLAMA_MODELS":
            if config.models_dir:
                lines.append(
                    f"{said} not carried: your config sets models_dir: {config.models_dir}"
                )
            else:
                config = dataclasses.replace(config, models_dir=value)
                lines.append(f"{said} -> models_dir: {value}")
        elif key == "OLLAMA_ORIGINS":
            proxy_env[key] = value
            lines.append(f"{said} -> ollamux.service Environment= (the proxy answers CORS)")
        elif key in PINNING:
            lines.append(f"{said} not carried: each instance is pinned to its GPU (gpu:)")
        elif key == "PATH":
            lines.append(f"{said} not carried: the units run ollama by its absolute path")
        elif key in _FIELDS:
            name, parse = _FIELDS[key]
            try:
                parsed: Any = parse(value)
                changed = [
                    dataclasses.replace(i, **{name: parsed})
                    if getattr(i, name) == getattr(defaults, name)
                    else i
                    for i in instances
                ]
            except (ValueError, ConfigError) as exc:
                lines.append(f"{said} not carried: {exc}")
                continue
            kept = [i.name for i, c in zip(instances, changed, strict=True) if i is c]
            instances = changed
            note = f" (not {', '.join(kept)}: your config sets {name})" if kept else ""
            lines.append(f"{said} -> instances' {name}{note}")
        else:
            changed = [
                i if key in i.env else dataclasses.replace(i, env={**i.env, key: value})
                for i in instances
            ]
            kept = [i.name for i, c in zip(instances, changed, strict=True) if i is c]
            instances = changed
            note = f" (not {', '.join(kept)}: its env sets {key})" if kept else ""
            lines.append(f"{said} -> instances' env{note}")
    config = dataclasses.replace(config, instances=tuple(instances))
    if user or group:
        fallback = account.home if user in ("", account.user) else f"/home/{user}"
        home = _home(Path(root), user, fallback) if user else account.home
        account = dataclasses.replace(
            account, user=user or account.user, group=group or user or account.group, home=home
        )
        lines.append(f"User={account.user} Group={account.group} -> every unit; home {home}")
    return Carried(config, dataclasses.replace(account, proxy_env=proxy_env), lines, warnings)


def ollama_host(value: str) -> str:
    """OLLAMA_HOST as Ollama reads it (``[scheme://]host[:port][/path]``), as ``HOST:PORT``."""
    text = value.strip().strip("\"'")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
        port = "11434"
    else:
        port = {"http": "80", "https": "443"}.get(scheme.lower(), "11434")
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.lstrip(":") or port
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        port = port_text or port
    else:
        host = rest
    host = host or "127.0.0.1"
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    parse_listen(listen)  # ValueError with the fix
    return listen


def _read_stock(root: Path) -> tuple[dict[str, tuple[str, str]], str, str, list[str]]:
    """Environment (name -> value, file), User, Group, and problems, as systemd would load them."""
    files: list[Path] = []
    for d in UNIT_DIRS:
        unit = root / d / STOCK
        if unit.is_file() and unit.resolve() != Path("/dev/null"):
            files.append(unit)
            break
    dropins: dict[str, Path] = {}
    for d in UNIT_DIRS:
        folder = root / d / f"{STOCK}.d"
        if folder.is_dir():
            for conf in folder.glob("*.conf"):
                dropins.setdefault(conf.name, conf)  # earlier directories win per name
    files += [dropins[name] for name in sorted(dropins)]
    assigned: list[tuple[str, str, str]] = []
    env_files: list[tuple[str, str]] = []
    user = group = ""
    problems: list[str] = []
    for path in files:
        shown = "/" + str(path.relative_to(root))
        for key, value in _service_lines(path):
            if key == "Environment":
                if not value:
                    assigned.clear()
                    continue
                try:
                    words = shlex.split(value)
                except ValueError as exc:
                    problems.append(f"Environment={value} ({shown}) not carried: {exc}")
                    continue
                for word in words:
                    name, sep, val = word.partition("=")
                    if sep:
                        assigned.append((name, val, shown))
            elif key == "EnvironmentFile":
                if not value:
                    env_files.clear()
                else:
                    env_files.append((value, shown))
            elif key == "User":
                user = value
            elif key == "Group":
                group = value
    env = {name: (val, shown) for name, val, shown in assigned}
    for spec, shown in env_files:  # systemd applies them after Environment=, in order
        optional = spec.startswith("-")
        target = root / spec.lstrip("-").lstrip("/")
        try:
            text = target.read_text(encoding="utf-8")
        except OSError as exc:
            if not optional:
                why = exc.strerror or exc
                problems.append(f"EnvironmentFile={spec} ({shown}) not carried: {why}")
            continue
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            try:
                words = shlex.split(line)
            except ValueError as exc:
                problems.append(f"{line} ({spec}) not carried: {exc}")
                continue
            if words and "=" in words[0]:
                name, _, val = words[0].partition("=")
                env[name.removeprefix("export ").strip()] = (val, spec.lstrip("-"))
    return env, user, group, problems


def _service_lines(path: Path) -> list[tuple[str, str]]:
    """``(key, value)`` of the ``[Service]`` section, continuation lines joined."""
    out: list[tuple[str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def _home(root: Path, user: str, fallback: str) -> str:
    """``user``'s home from the passwd file under ``root``, or ``fallback``."""
    try:
        for line in (root / "etc/passwd").read_text(encoding="utf-8").splitlines():
            fields = line.split(":")
            if len(fields) >= 6 and fields[0] == user:
                return fields[5]
    except OSError:
        pass
    return fallback
