"""The `process` launcher: one supervised ``ollama serve`` per instance, pinned to its GPU(s).

Each instance runs the real ``ollama serve`` with ``CUDA_VISIBLE_DEVICES=<uuid>`` (its GPUs, pinned
by :mod:`proxy.instances.pinning`), ``OLLAMA_HOST=127.0.0.1:<port>``, the shared model store and its
``OLLAMA_*`` settings. :func:`instance_env` is also what the systemd env files contain, so both
launchers start an identical server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from proxy.config import Config, InstanceConfig
from proxy.errors import LaunchError
from proxy.instances.ports import port_problem
from proxy.instances.supervisor import ChildSpec

__all__ = ["OWNED", "find_ollama", "instance_env", "models_dir", "process_child"]

OWNED = (
    "OLLAMA_HOST",
    "OLLAMA_MODELS",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_SCHED_SPREAD",
)
"""Set from the config, or left to Ollama's default: never inherited from ollamux's environment."""

_FIX = (
    "install Ollama (https://ollama.com/download), or set ollama_binary in the config to the "
    "path of the ollama executable, e.g. ollama_binary: /usr/local/bin/ollama"
)


def find_ollama(config: Config) -> str:
    """The absolute path of the ``ollama`` to run: ``ollama_binary``, else ``ollama`` on PATH."""
    wanted = config.ollama_binary or "ollama"
    where = f"{config.source}: " if config.source else ""
    if "/" not in wanted:
        found = shutil.which(wanted)
        if found is None:
            key = f"ollama_binary {wanted!r}" if config.ollama_binary else "`ollama`"
            raise LaunchError(f"{where}{key} is not on PATH; {_FIX}")
        return str(Path(found).absolute())
    path = Path(wanted).expanduser().absolute()
    if not path.is_file():
        raise LaunchError(f"{where}ollama_binary: {path} does not exist; {_FIX}")
    if not os.access(path, os.X_OK):
        raise LaunchError(f"{where}ollama_binary: {path} is not executable; chmod +x it, or {_FIX}")
    return str(path)


def models_dir(config: Config) -> str:
    """``models_dir`` as an absolute path (``~`` expanded), or empty for Ollama's default."""
    if not config.models_dir:
        return ""
    return str(Path(config.models_dir).expanduser().absolute())


def instance_env(config: Config, instance: InstanceConfig) -> dict[str, str]:
    """The environment ``ollama serve`` gets for ``instance`` (on top of the inherited one)."""
    env: dict[str, str] = {}
    if instance.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(ref) for ref in instance.gpu)
    env["OLLAMA_HOST"] = f"127.0.0.1:{instance.port}"
    if config.models_dir:
        env["OLLAMA_MODELS"] = models_dir(config)
    env["OLLAMA_NUM_PARALLEL"] = str(instance.slots)
    env["OLLAMA_KEEP_ALIVE"] = instance.keep_alive
    if instance.max_loaded_models:
        env["OLLAMA_MAX_LOADED_MODELS"] = str(instance.max_loaded_models)
    env["OLLAMA_MAX_QUEUE"] = str(instance.max_queue)
    if instance.context_length:
        env["OLLAMA_CONTEXT_LENGTH"] = str(instance.context_length)
    if instance.spread:
        env["OLLAMA_SCHED_SPREAD"] = "1"
    env.update(instance.env)
    return env


def process_child(config: Config, instance: InstanceConfig, binary: str) -> ChildSpec:
    """The supervised ``ollama serve`` of ``instance``; LaunchError if its port is taken."""
    problem = port_problem("127.0.0.1", instance.port)
    if problem:
        raise LaunchError(
            f"instance {instance.name}: {problem}; stop it (the stock Ollama service: "
            "sudo systemctl disable --now ollama) or give the instance another port"
        )
    env = instance_env(config, instance)
    gpus = env.get("CUDA_VISIBLE_DEVICES", "")
    return ChildSpec(
        name=instance.name,
        argv=(binary, "serve"),
        health_url=f"http://127.0.0.1:{instance.port}/",
        env=env,
        # As under systemd, where the env file is all there is: the config says, not the shell.
        unset=tuple(key for key in OWNED if key not in env),
        label=f"CUDA_VISIBLE_DEVICES={gpus}" if gpus else "every GPU it can see (not pinned)",
    )
