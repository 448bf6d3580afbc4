"""The resolved configuration as YAML: what `ollamux config check` prints."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import yaml

from proxy.config import Config, InstanceConfig

__all__ = ["config_tree", "dump_config", "plain"]


def dump_config(config: Config) -> str:
    """Every key with its value: defaults filled in, ports assigned, the catalogue spelled out.

    The output loads back into the same configuration.
    """
    # Imported here: the catalogue module builds on proxy.config.
    from proxy.emulator.catalogue import DEFAULT_MODELS

    if not config.emulator.models:
        emulator = dataclasses.replace(config.emulator, models=DEFAULT_MODELS)
        config = dataclasses.replace(config, emulator=emulator)
    tree = config_tree(config)
    header = f"# {config.source}, resolved by ollamux config check\n" if config.source else ""
    header += "".join(f"# warning: {w}\n" for w in config.warnings)
    return header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=100)


def config_tree(config: Config) -> dict[str, Any]:
    """The YAML keys of ``config``: without what the loader set, without settings that mean
    nothing for an instance's launcher."""
    tree: dict[str, Any] = plain(config)
    del tree["source"], tree["warnings"]
    for inst, entry in zip(_instances(config), tree["instances"], strict=False):
        unused = InstanceConfig.LAUNCHED_ONLY if inst.remote else InstanceConfig.EXTERNAL_ONLY
        if inst.launcher == "node":  # a node publishes its own GPUs and slots
            kept = InstanceConfig.NODE_KEEPS
            unused = (*unused, "gpu", "num_parallel")
            unused += tuple(k for k in InstanceConfig.EXTERNAL_ONLY if k not in kept)
        for key in unused:
            del entry[key]
    return tree


def _instances(config: Config) -> tuple[InstanceConfig, ...]:
    return () if config.instances == "auto" else config.instances


def plain(value: Any) -> Any:
    """A config (or any part of it) as plain YAML-able values, in the form the loader reads."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return -1  # durations: negative means forever
    return value
