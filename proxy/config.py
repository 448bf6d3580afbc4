"""Configuration: frozen dataclasses, YAML loading and validation with errors that name the field.

Every section is a frozen, keyword-only dataclass. ``load_config(path)`` reads YAML, builds the tree
with :func:`proxy.config_build.build` (which checks unknown keys and types against the
annotations) and then runs the cross-field checks (duplicate ports, GPUs, names). Errors are
:class:`~proxy.errors.ConfigError` naming the file, the field path (``instances[2].port``) and a
fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml

from proxy import yamlfile
from proxy.config_build import NOT_FROM_YAML, build, check, strip_path, unique

# The emulator's sections, re-exported: to its users the schema is one module.
from proxy.config_emulator import GIB as GIB
from proxy.config_emulator import EmulatorConfig as EmulatorConfig
from proxy.config_emulator import GpuSpec as GpuSpec
from proxy.config_emulator import ModelSpec as ModelSpec

# The instances section, re-exported likewise.
from proxy.config_instance import InstanceConfig as InstanceConfig
from proxy.config_instance import Launcher as Launcher
from proxy.config_instance import url_problem as url_problem
from proxy.errors import ConfigError
from proxy.frontdoor import origin_problem

Duration = Annotated[float, "duration"]
"""Seconds; YAML may say ``30``, ``"30s"``, ``"5m"`` or ``"1h30m"``; negative means forever."""

Size = Annotated[int, "size"]
"""Bytes; YAML may say ``67108864``, ``"64MiB"``, ``"1GiB"`` or ``"500MB"``."""

PolicyName = Literal["vram_queue", "least_connections", "round_robin", "random"]

MIB = 1024**2


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    """Which policy picks the instance and how it may bend its rules."""

    policy: PolicyName = "vram_queue"
    session_affinity: bool = True
    scale_out: bool = True
    """Load a replica on an idle GPU when the wait behind the warm ones exceeds its load time."""
    preload: bool = True
    """Load such a replica in the background and send requests there once it is loaded (else the
    request that asked for it waits for the load there, even if a warm slot frees first)."""
    attempts: int = 3
    """Distinct instances a request may be tried on before its first byte reaches the client."""
    overcommit: int = 0
    """Requests per instance bound beyond its slots while every warm slot is busy and no replica
    is worth loading: they wait inside Ollama and start the moment a slot frees, with no trip
    back through the proxy; 0 = none (every wait is in the proxy, where it can move)."""

    def __post_init__(self) -> None:
        check(self.attempts >= 1, "attempts", "must be >= 1, e.g. 3")
        check(0 <= self.overcommit <= 4, "overcommit", "must be 0 to 4, e.g. 1")


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    """Proxy-side admission control."""

    max_per_model: int = 64
    max_total: int = 512
    timeout: Duration = 300.0

    def __post_init__(self) -> None:
        check(self.max_per_model >= 1, "max_per_model", "must be >= 1")
        check(self.max_total >= self.max_per_model, "max_total", "must be >= max_per_model")
        check(self.timeout > 0, "timeout", "must be > 0, e.g. 5m")


@dataclass(frozen=True, kw_only=True)
class TimeoutConfig:
    """Deadlines towards the instances, one per phase of a request: a hang is told from a load."""

    RETIRED: ClassVar[dict[str, str]] = {
        "first_byte": "use load (a cold model's load), first_token and idle (between chunks)",
    }

    connect: Duration = 5.0
    health_interval: Duration = 2.0
    health_timeout: Duration = 2.0
    start: Duration = 60.0
    """How long an instance may take to answer its first health check."""
    load: Duration = 120.0
    """Floor of the wait for a cold model to load before the first token; the deadline is the
    larger of this and four times the model's expected load time (learned from its loads)."""
    first_token: Duration = 10.0
    """Floor of the wait for the first token once the model is loaded; the deadline grows with the
    prompt's length at the learned prompt rate."""
    idle: Duration = 30.0
    """Longest silence between two chunks of an answer before the stream is given up."""
    drain: Duration = 30.0
    """On SIGTERM or Ctrl-C: how long requests in flight may take to finish before the proxy
    stops them and the instances."""

    def __post_init__(self) -> None:
        for name in (
            "connect", "health_interval", "health_timeout", "start", "load", "first_token",
            "idle", "drain",
        ):  # fmt: skip
            check(getattr(self, name) > 0, name, "must be > 0, e.g. 5s")


@dataclass(frozen=True, kw_only=True)
class EjectionConfig:
    """Outlier ejection: instances whose requests keep failing are taken out for a while."""

    consecutive: int = 3
    """Failed requests in a row (connect errors, timeouts, 5xx, broken streams) that eject it."""
    base: Duration = 5.0
    """First ejection's length; it doubles each time the instance fails again after coming back."""
    max: Duration = 300.0

    def __post_init__(self) -> None:
        check(self.consecutive >= 1, "consecutive", "must be >= 1, e.g. 3")
        check(self.base > 0, "base", "must be > 0, e.g. 5s")
        check(self.max >= self.base, "max", "must be >= base, e.g. 5m")


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """What the proxy accepts from its clients: body sizes and how long a connection may idle."""

    max_body: Size = 64 * MIB
    """Largest request body; a larger one gets 413. ``/api/blobs`` uploads stream to an instance
    and have no limit."""
    client_idle: Duration = 30.0
    """A client connection that has not sent a complete request head this long after connecting
    or after its last answer is closed (idle keep-alive connections, clients that trickle their
    headers); a request body that stalls this long gets 408."""

    def __post_init__(self) -> None:
        check(self.max_body >= 1024, "max_body", "must be at least 1KiB, e.g. 64MiB")
        check(self.client_idle > 0, "client_idle", "must be > 0, e.g. 30s")


@dataclass(frozen=True, kw_only=True)
class CorsConfig:
    """Browser origins allowed besides Ollama's defaults and ``OLLAMA_ORIGINS``."""

    origins: tuple[str, ...] = ()
    """Like OLLAMA_ORIGINS entries: ``https://webui.example.com``, ``http://10.0.0.*``, ``*``."""

    def __post_init__(self) -> None:
        for i, origin in enumerate(self.origins):
            problem = origin_problem(origin)
            check(problem is None, f"origins[{i}]", problem or "")


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    """API keys: the file that holds their hashes, and whether status endpoints need one too."""

    keys_file: str = ""
    """The key file of ``ollamux keys``; "" = no keys. Once it holds a key, every API request
    needs ``Authorization: Bearer KEY``. Relative to the config file's directory."""
    protect_status: bool = False
    """Whether ``GET /proxy/status``, ``/proxy/instances`` and ``/metrics`` need a key as well."""

    def __post_init__(self) -> None:
        path = self.keys_file
        check(
            path == path.strip() and "\n" not in path,
            "keys_file",
            "must be a file path without spaces around it, e.g. /etc/ollamux/keys.yaml",
        )


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole ollamux configuration."""

    listen: str = "127.0.0.1:11434"
    models_dir: str = ""
    """Shared model store (OLLAMA_MODELS) of all instances; empty = Ollama's default."""
    ollama_binary: str = ""
    """The ``ollama`` executable of process and systemd instances; empty = ``ollama`` on PATH."""
    admin_token: str = ""
    """Bearer token of the admin actions (``POST /proxy/instances/...``); needed beyond loopback."""
    instances: tuple[InstanceConfig, ...] | Literal["auto"] = "auto"
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    ejection: EjectionConfig = field(default_factory=EjectionConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    source: str = ""
    """The file this config came from (set by the loader, not read from YAML)."""
    warnings: tuple[str, ...] = ()
    """Settings that are valid but probably not what the operator wants (set by the loader)."""

    def __post_init__(self) -> None:
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            raise ConfigError(str(exc), path="listen") from None
        binary = self.ollama_binary
        check(
            binary == binary.strip() and "\n" not in binary,
            "ollama_binary",
            "must be a path or a command name without spaces around it, e.g. /usr/local/bin/ollama",
        )
        token = self.admin_token
        check(
            not token or (len(token) >= 16 and not any(c.isspace() for c in token)),
            "admin_token",
            "must be 16 or more characters without spaces, e.g. from: openssl rand -hex 32",
        )


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) to a pair; raises ValueError with a fix."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT; use e.g. 127.0.0.1:11434")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_config(path: str | Path) -> Config:
    """Read, build and validate a config file; every problem is a ConfigError naming the field."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file ({exc.strerror})", source=source) from None
    try:
        raw = yamlfile.safe_load(text)  # a duplicate key is an error, with its line
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(exc), source=source, path=_yaml_line(exc)) from None
    config = config_from_dict({} if raw is None else raw, source=source)
    return _keys_file_beside(config, Path(path))


def _keys_file_beside(config: Config, path: Path) -> Config:
    """``auth.keys_file`` made absolute: ``~`` expanded, relative to the config file's directory."""
    keys_file = config.auth.keys_file
    if not keys_file:
        return config
    resolved = path.parent / Path(keys_file).expanduser()
    auth = dataclasses.replace(config.auth, keys_file=str(resolved.absolute()))
    return dataclasses.replace(config, auth=auth)


def _yaml_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line, without its source excerpt (``in "<unicode string>"``)."""
    problem = getattr(exc, "problem", None)
    if not problem:
        return f"not valid YAML: {str(exc).splitlines()[0]}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    started = f" at line {context_mark.line + 1}" if context_mark is not None else ""
    also = f" ({context}{started})" if context else ""
    return f"not valid YAML: {problem}{also}"


def config_from_dict(raw: object, *, source: str = "") -> Config:
    """Build a validated Config from already-parsed YAML (a mapping)."""
    for key in NOT_FROM_YAML:
        if isinstance(raw, dict) and key in raw:
            raise ConfigError(f"unknown key {key!r}", source=source, path=key)
    try:
        config = build(Config, raw, "")
        config = dataclasses.replace(config, source=source)
        return _resolve(config)
    except ConfigError as exc:
        sourced = [
            p if p.source else ConfigError(strip_path(p), source=source, path=p.path)
            for p in exc.problems
        ]
        raise ConfigError.of(sourced) from None


def _resolve(config: Config) -> Config:
    """Cross-field checks and defaults that need the whole tree (ports, GPUs, names)."""
    if config.instances == "auto":
        return config
    instances = list(config.instances)
    unique([inst.name for inst in instances], "instances", "name")
    gpu_names = [g.name for g in config.emulator.gpus]
    next_port = 11435
    taken = {inst.port for inst in instances}
    _, listen_port = parse_listen(config.listen)
    warnings = []
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if inst.launcher == "external" and not inst.num_parallel:
            warnings.append(
                f"{where}.num_parallel: not set for external instance {inst.name}; ollamux assumes "
                "1 (Ollama's default since 0.10). Set it to that server's OLLAMA_NUM_PARALLEL: "
                "more than it has makes requests wait inside Ollama, fewer leaves slots idle"
            )
        if not inst.remote and inst.port == 0:
            while next_port in taken or next_port == listen_port:
                next_port += 1
            taken.add(next_port)
            instances[i] = inst = dataclasses.replace(inst, port=next_port)
        if not inst.remote and inst.port == listen_port:
            raise ConfigError(
                f"port {inst.port} is the proxy's own listen port; pick another",
                path=f"{where}.port",
            )
        if inst.launcher == "emulated":
            if not gpu_names:
                raise ConfigError(
                    "launcher emulated needs emulated GPUs; add an emulator.gpus list",
                    path=f"{where}.launcher",
                )
            for j, ref in enumerate(inst.gpu):
                if not _emulated_gpu_exists(ref, gpu_names):
                    raise ConfigError(
                        f"{ref!r} is not an emulated GPU; use one of {gpu_names} or its index",
                        path=f"{where}.gpu[{j}]" if len(inst.gpu) > 1 else f"{where}.gpu",
                    )
            if not inst.gpu:
                raise ConfigError(
                    "an emulated instance needs its GPU(s); e.g. gpu: 0", path=f"{where}.gpu"
                )
    seen_ports: dict[int, int] = {}
    seen_gpus: dict[str, int] = {}
    for i, inst in enumerate(instances):
        if not inst.remote:
            if inst.port in seen_ports:
                raise ConfigError(
                    f"port {inst.port} is already used by instances[{seen_ports[inst.port]}]; "
                    "give each instance its own port",
                    path=f"instances[{i}].port",
                )
            seen_ports[inst.port] = i
        for ref in inst.gpu:
            key = _gpu_key(ref, gpu_names if inst.launcher == "emulated" else [])
            if seen_gpus.get(key) == i:
                raise ConfigError(
                    f"GPU {ref!r} is listed twice; list each GPU once", path=f"instances[{i}].gpu"
                )
            if key in seen_gpus and not inst.spread:
                raise ConfigError(
                    f"GPU {ref!r} is already owned by instances[{seen_gpus[key]}]; "
                    "each GPU belongs to one instance",
                    path=f"instances[{i}].gpu",
                )
            seen_gpus.setdefault(key, i)
    return dataclasses.replace(config, instances=tuple(instances), warnings=tuple(warnings))


def _emulated_gpu_exists(ref: int | str, names: list[str]) -> bool:
    if isinstance(ref, int):
        return 0 <= ref < len(names)
    return ref in names


def _gpu_key(ref: int | str, emulated_names: list[str]) -> str:
    if isinstance(ref, int) and emulated_names:
        return emulated_names[ref]
    return str(ref)


def emulated_gpus(config: Config, instance: InstanceConfig) -> tuple[GpuSpec, ...]:
    """The emulated GPUs an emulated instance owns, in the order it lists them."""
    by_name = {g.name: g for g in config.emulator.gpus}
    out = []
    for ref in instance.gpu:
        out.append(config.emulator.gpus[ref] if isinstance(ref, int) else by_name[ref])
    return tuple(out)
