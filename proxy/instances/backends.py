"""`ollamux serve --backend URL ...`: a config of external instances built from command-line flags.

Each ``--backend`` becomes an ``external`` instance, built through
:func:`~proxy.config.config_from_dict` so that every check a config file gets runs on it too. Its
name comes from the URL's host and port (``http://10.0.0.5:11434`` -> ``10.0.0.5-11434``): it says
which server a log line or a metric is about, stays the same whatever order the flags come in, and
keeps to letters, digits, ``.``, ``_`` and ``-``, so it reads as one logfmt value and fits in
``/proxy/instances/NAME/drain`` as it is.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Sequence

from proxy.config import Config, config_from_dict, load_config, url_problem
from proxy.errors import ConfigError

__all__ = ["SOURCE", "backend_names", "backends_config", "serve_config"]

SOURCE = "--backend"
"""The ``source`` of a config built from ``--backend`` flags: where its errors come from."""

_EXAMPLE = "e.g. --backend http://10.0.0.5:11434"
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def serve_config(
    config_file: str | None, backends: Sequence[str], num_parallel: int | None
) -> Config:
    """The config `ollamux serve` runs: from ``--config``, from ``--backend`` flags, or the default
    (one Ollama per GPU). ConfigError when the flags do not go together."""
    if backends and config_file:
        raise ConfigError(
            "cannot be used with --config: either name the servers with --backend, or list "
            "them in the config file as instances with launcher: external",
            path=SOURCE,
        )
    if num_parallel is not None and not backends:
        raise ConfigError(
            "applies to the --backend servers only; in a config file set each instance's "
            "num_parallel",
            path="--num-parallel",
        )
    if backends:
        return backends_config(backends, num_parallel=num_parallel)
    return load_config(config_file) if config_file else Config()


def backends_config(urls: Sequence[str], *, num_parallel: int | None = None) -> Config:
    """A config with one ``external`` instance for each of ``urls``; ConfigError naming the flag."""
    problems: list[ConfigError] = []
    seen: set[str] = set()
    for url in urls:
        problem = url_problem(url)
        if problem:
            problems.append(ConfigError(f"{problem}, {_EXAMPLE}", path=SOURCE))
        elif url.rstrip("/") in seen:
            problems.append(
                ConfigError(f"{url} is given twice; name each server once", path=SOURCE)
            )
        seen.add(url.rstrip("/"))
    if num_parallel is not None and num_parallel < 1:
        problems.append(
            ConfigError(
                "must be >= 1: the servers' OLLAMA_NUM_PARALLEL, e.g. --num-parallel 2",
                path="--num-parallel",
            )
        )
    if problems:
        raise ConfigError.of(problems)
    instances = []
    for name, url in zip(backend_names(urls), urls, strict=True):
        inst: dict[str, object] = {"name": name, "launcher": "external", "url": url}
        if num_parallel is not None:
            inst["num_parallel"] = num_parallel
        instances.append(inst)
    config = config_from_dict({"instances": instances}, source=SOURCE)
    if num_parallel is None:
        assumed = [w for w in config.warnings if ".num_parallel:" in w]
        if assumed:
            # One line naming the flag, instead of one per instance naming config keys.
            warning = (
                "--num-parallel: not given; ollamux assumes each --backend serves 1 request at a "
                "time (Ollama's default since 0.10). Pass the servers' OLLAMA_NUM_PARALLEL, e.g. "
                "--num-parallel 2: more than they have makes requests wait inside Ollama, fewer "
                "leaves slots idle"
            )
            others = tuple(w for w in config.warnings if w not in assumed)
            config = dataclasses.replace(config, warnings=(warning, *others))
    return config


def backend_names(urls: Sequence[str]) -> list[str]:
    """An instance name for each URL: ``host-port`` (``host`` when the URL names no port), with
    ``-2``, ``-3`` ... after a name already taken (two servers behind one host's paths)."""
    names: list[str] = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        host = _NOT_A_NAME.sub("_", parts.hostname or "backend")  # an IPv6 address's colons
        base = f"{host}-{parts.port}" if parts.port else host
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names
