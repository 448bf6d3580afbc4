"""`ollamux emulate`: flags, a config instance and OLLAMA_* variables made into a running emulator.

Each setting is taken from the first of: its command-line flag, the config instance (``--config``
with ``--instance``), the environment variable real Ollama reads (``OLLAMA_NUM_PARALLEL``, ...), and
Ollama's own default. With a config instance every setting is given, so the environment only matters
for a stand-alone emulator; ``OLLAMA_ORIGINS`` has no config field and is always read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import (
    Config,
    GpuSpec,
    InstanceConfig,
    ModelSpec,
    emulated_gpus,
    load_config,
    parse_listen,
)
from proxy.emulator.events import ServerSettings
from proxy.errors import ConfigError, LaunchError
from proxy.frontdoor import parse_origins
from proxy.ollama_host import parse_ollama_host
from proxy.units import DurationError, format_bytes, parse_duration

__all__ = ["EmulateOptions", "EmulatorPlan", "emulate", "parse_gpu", "plan_emulator"]

log = logging.getLogger("ollamux.emulator")

DEFAULT_LISTEN = "127.0.0.1:11434"

# Ollama's defaults (shared/reference/ollama.md §6.1) where they differ from InstanceConfig's.
_OLLAMA_DEFAULTS = InstanceConfig(name="emulate", launcher="emulated", num_parallel=1)

# InstanceConfig field -> (environment variable, kind of value)
_ENV = {
    "num_parallel": ("OLLAMA_NUM_PARALLEL", "uint"),
    "keep_alive": ("OLLAMA_KEEP_ALIVE", "duration"),
    "max_loaded_models": ("OLLAMA_MAX_LOADED_MODELS", "uint"),
    "max_queue": ("OLLAMA_MAX_QUEUE", "uint"),
    "context_length": ("OLLAMA_CONTEXT_LENGTH", "uint"),
    "spread": ("OLLAMA_SCHED_SPREAD", "bool"),
}


@dataclass(frozen=True, kw_only=True)
class EmulateOptions:
    """The `ollamux emulate` command line; None means the flag was not given."""

    listen: str | None = None
    gpus: tuple[str, ...] = ()
    """``NAME:GIB`` or ``NAME:GIB:SPEED`` each; several = one server over several GPUs."""
    config: str | None = None
    instance: str | None = None
    speed: float | None = None
    num_parallel: int | None = None
    keep_alive: str | None = None
    max_loaded_models: int | None = None
    max_queue: int | None = None
    context_length: int | None = None
    spread: bool | None = None
    models_dir: str | None = None
    seed: int | None = None
    quiet: bool = False
    """No access-log line per request."""


@dataclass(frozen=True, kw_only=True)
class EmulatorPlan:
    """Everything one emulated server needs, resolved and validated."""

    host: str
    port: int
    settings: ServerSettings
    speed: float
    """RealClock's time compression."""
    models: tuple[ModelSpec, ...]
    """The catalogue; empty means the built-in one."""
    models_dir: Path | None
    registry_gbps: float
    version: str
    seed: int

    def describe(self) -> str:
        """The one start-up log line: where it listens, its GPUs and its settings."""
        s = self.settings
        gpus = ", ".join(
            f"{g.name} ({format_bytes(g.memory_bytes)}, speed {g.speed:g})" for g in s.gpus
        )
        keep = "forever" if math.isinf(s.keep_alive) else f"{s.keep_alive:g}s"
        loaded = s.max_loaded_models or f"auto ({3 * len(s.gpus)})"
        ctx = s.context_length or "auto"
        store = self.models_dir or "in memory"
        return (
            f"emulated Ollama {self.version} starting on http://{_hostport(self.host, self.port)} "
            f"with {len(s.gpus)} GPU(s): {gpus}; num_parallel={s.num_parallel} keep_alive={keep} "
            f"max_loaded_models={loaded} max_queue={s.max_queue} context_length={ctx} "
            f"spread={'on' if s.spread else 'off'} speed=x{self.speed:g} models_dir={store}"
        )


def parse_gpu(text: str) -> GpuSpec:
    """``NAME:GIB[:SPEED]`` (e.g. ``rtx4090:24`` or ``l40s:48:0.85``) to an emulated GPU."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError
        speed = float(parts[2]) if len(parts) == 3 else 1.0
        return GpuSpec(name=parts[0], memory_gib=float(parts[1]), speed=speed)
    except (ValueError, ConfigError) as exc:
        detail = f" ({exc})" if isinstance(exc, ConfigError) else ""
        raise ConfigError(
            f"{text!r} is not NAME:GIB[:SPEED]{detail}; use e.g. rtx4090:24 or l40s:48:0.85",
            path="--gpu",
        ) from None


def plan_emulator(options: EmulateOptions, environ: Mapping[str, str]) -> EmulatorPlan:
    """Resolve options, config and environment into a plan; raises ConfigError naming the flag."""
    config, instance = _config_instance(options)
    base = instance or _from_env(environ)
    overrides = {
        name: getattr(options, name) for name in _ENV if getattr(options, name) is not None
    }
    if options.num_parallel is not None and options.num_parallel < 1:
        raise ConfigError("must be >= 1, e.g. 4", path="--num-parallel")
    try:
        settings_source = dataclasses.replace(base, **overrides)
    except ConfigError as exc:
        flag = "--" + exc.path.replace("_", "-")
        raise ConfigError(str(exc).removeprefix(f"{exc.path}: "), path=flag) from None

    if options.gpus:
        gpus = tuple(parse_gpu(g) for g in options.gpus)
    elif instance is not None:
        gpus = emulated_gpus(config, instance)
    else:
        raise ConfigError(
            "no GPU given; use --gpu NAME:GIB (e.g. --gpu rtx4090:24), "
            "or --config FILE --instance NAME",
            path="--gpu",
        )
    names = [g.name for g in gpus]
    if len(set(names)) != len(names):
        raise ConfigError(f"GPU names must differ, got {names}", path="--gpu")

    if options.listen is not None:
        try:
            host, port = parse_listen(options.listen)
        except ValueError as exc:
            raise ConfigError(str(exc), path="--listen") from None
    elif instance is not None:
        host, port = "127.0.0.1", instance.port
    elif environ.get("OLLAMA_HOST", "").strip():
        # As `ollama serve` reads it: `:PORT` listens on every interface, a bare host on 11434.
        _, host, port = parse_ollama_host(environ["OLLAMA_HOST"])
        host = host or "0.0.0.0"
    else:
        host, port = parse_listen(DEFAULT_LISTEN)

    speed = options.speed if options.speed is not None else config.emulator.speed
    if not speed > 0:
        raise ConfigError(
            f"must be > 0 (1 = real time, 20 = 20x faster), got {speed}", path="--speed"
        )

    emulator = config.emulator
    settings = ServerSettings(
        gpus=gpus,
        num_parallel=settings_source.slots,
        max_loaded_models=settings_source.max_loaded_models,
        max_queue=settings_source.max_queue,
        keep_alive=parse_duration(settings_source.keep_alive, env_style=True),
        context_length=settings_source.context_length,
        spread=settings_source.spread,
        spread_penalty=emulator.spread_penalty,
        cpu_slowdown=emulator.cpu_slowdown,
        origins=parse_origins(environ.get("OLLAMA_ORIGINS", "")),
        seed=options.seed if options.seed is not None else emulator.seed,
    )
    models_dir = options.models_dir if options.models_dir is not None else config.models_dir
    return EmulatorPlan(
        host=host,
        port=port,
        settings=settings,
        speed=speed,
        models=emulator.models,
        models_dir=Path(models_dir).expanduser() if models_dir else None,
        registry_gbps=emulator.registry_gbps,
        version=emulator.version,
        seed=options.seed if options.seed is not None else emulator.seed,
    )


def emulate(options: EmulateOptions, environ: Mapping[str, str]) -> None:
    """Run one emulated Ollama server until SIGINT or SIGTERM."""
    plan = plan_emulator(options, environ)
    asyncio.run(_serve(plan, access_log=not options.quiet))


async def _serve(plan: EmulatorPlan, *, access_log: bool = True) -> None:
    # Imported here so `config check` and the unit tests of the plan need no HTTP app.
    from proxy.emulator.catalogue import Catalogue
    from proxy.emulator.clock import RealClock
    from proxy.emulator.engine import Engine
    from proxy.emulator.server import build_emulator_app, run_emulator
    from proxy.emulator.store import ModelStore
    from proxy.instances.supervisor import stop_on_signals

    catalogue = Catalogue(plan.models)
    clock = RealClock(plan.speed)
    engine = Engine(plan.settings, clock)  # OLLAMA_ORIGINS travel in its settings
    store = ModelStore(plan.models_dir, catalogue, clock=clock, registry_gbps=plan.registry_gbps)
    app = build_emulator_app(engine, store, catalogue, version=plan.version, bind_host=plan.host)
    stop = asyncio.Event()
    stop_on_signals(stop)
    server = asyncio.ensure_future(run_emulator(app, plan.host, plan.port, access_log=access_log))
    stopping = asyncio.ensure_future(stop.wait())
    log.info("%s", plan.describe())
    try:
        await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (server, stopping):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if not server.cancelled():
        try:
            server.result()  # it only ends on its own by failing, e.g. the port is taken
        except OSError as exc:
            where = _hostport(plan.host, plan.port)
            raise LaunchError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    log.info("emulated Ollama on %s stopped", _hostport(plan.host, plan.port))


def _config_instance(options: EmulateOptions) -> tuple[Config, InstanceConfig | None]:
    if options.config is None:
        if options.instance is not None:
            raise ConfigError("needs --config FILE to look the instance up in", path="--instance")
        return Config(), None
    config = load_config(options.config)
    emulated = (
        [i for i in config.instances if i.launcher == "emulated"]
        if config.instances != "auto"
        else []
    )
    if options.instance is None:
        if len(emulated) == 1:
            return config, emulated[0]
        raise ConfigError(
            f"{options.config} has {len(emulated)} emulated instances; "
            f"pick one with --instance ({', '.join(i.name for i in emulated) or 'none'})",
            path="--instance",
        )
    for inst in emulated:
        if inst.name == options.instance:
            return config, inst
    if config.instances != "auto" and any(i.name == options.instance for i in config.instances):
        raise ConfigError(
            f"instance {options.instance!r} in {options.config} is not launcher: emulated",
            path="--instance",
        )
    known = ", ".join(i.name for i in emulated) or "none"
    raise ConfigError(
        f"no emulated instance {options.instance!r} in {options.config}; known: {known}",
        path="--instance",
    )


def _from_env(environ: Mapping[str, str]) -> InstanceConfig:
    """Ollama's defaults, overridden by the OLLAMA_* variables that parse (others get a warning)."""
    values: dict[str, Any] = {}
    for name, (var, kind) in _ENV.items():
        raw = environ.get(var, "").strip().strip("\"'")
        if not raw:
            continue
        if kind == "bool":
            # Go's strconv.ParseBool, where anything it rejects counts as true (like Ollama).
            values[name] = raw not in ("0", "f", "F", "false", "FALSE", "False")
        elif kind == "duration":
            try:
                parse_duration(raw, env_style=True)
                values[name] = raw
            except DurationError:
                log.warning("invalid %s=%r, using the default", var, raw)
        elif raw.isdigit():
            # A NUM_PARALLEL of 0 still gives one slot.
            values[name] = max(int(raw), 1) if name == "num_parallel" else int(raw)
            if name == "max_queue" and values[name] == 0:
                values[name] = _OLLAMA_DEFAULTS.max_queue
        else:
            log.warning("invalid %s=%r, using the default", var, raw)
    return dataclasses.replace(_OLLAMA_DEFAULTS, **values)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
