"""Which GPUs each local instance is pinned to: ``instances: auto`` expanded, indexes made UUIDs.

CUDA's numeric GPU order can change across boots, UUIDs do not (reference/ollama.md §9.2), so the
``process`` and ``systemd`` instances are pinned by UUID: ``instances: auto`` becomes one
``process`` instance per GPU (per MIG device on a GPU in MIG mode, since one CUDA process sees one
MIG device), and a GPU given by index is replaced by its UUID. :func:`pin` is pure: it takes what
NVML found (or None and the reason it found nothing) and returns the config to run.
"""

from __future__ import annotations

import dataclasses
import logging

from proxy.config import Config, InstanceConfig, parse_listen
from proxy.errors import ConfigError, GpuUnavailable, LaunchError
from proxy.gpu.nvml import NvmlGpu, discover

__all__ = ["FIRST_PORT", "LOCAL", "needs_gpus", "pin", "pin_with_nvml"]

log = logging.getLogger("ollamux.pinning")

FIRST_PORT = 11435
LOCAL = ("process", "systemd")
"""Launchers whose servers run on this host and are pinned with CUDA_VISIBLE_DEVICES."""


def needs_gpus(config: Config) -> bool:
    """Whether ``config`` has local instances whose GPUs NVML should resolve or check."""
    if config.instances == "auto":
        return True
    return any(inst.launcher in LOCAL and inst.gpu for inst in config.instances)


def pin_with_nvml(config: Config) -> Config:
    """:func:`pin` with what NVML finds on this host, asked only when the config needs it."""
    if not needs_gpus(config):
        return config
    try:
        gpus: list[NvmlGpu] | None = discover(processes=False)
        problem = ""
    except GpuUnavailable as exc:
        gpus, problem = None, str(exc)
    return pin(config, gpus, problem)


def pin(config: Config, gpus: list[NvmlGpu] | None, problem: str = "") -> Config:
    """``config`` with auto expanded and local GPU indexes replaced by UUIDs.

    ``gpus`` None means NVML could not tell (``problem`` says why): auto is then an error, while
    listed GPUs are kept as given, with a warning for each index.
    """
    if config.instances == "auto":
        return dataclasses.replace(config, instances=_auto(config, gpus, problem))
    instances = list(config.instances)
    for i, inst in enumerate(instances):
        if inst.launcher in LOCAL and inst.gpu:
            refs = tuple(_resolve(config, i, inst, ref, gpus) for ref in inst.gpu)
            instances[i] = dataclasses.replace(inst, gpu=refs)
    _check_owners(config, instances)
    return dataclasses.replace(config, instances=tuple(instances))


def _auto(config: Config, gpus: list[NvmlGpu] | None, problem: str) -> tuple[InstanceConfig, ...]:
    where = f"{config.source}: instances: auto" if config.source else "no config given, and"
    if gpus is None:
        raise LaunchError(
            f"{where} NVML finds no GPU to run one Ollama per GPU on: {problem}. List the "
            "instances in a config file (see config/example.yaml), or try the emulated demo box: "
            "ollamux demo"
        )
    pinned: list[tuple[str, str]] = []
    for gpu in gpus:
        index = gpu.reading.index
        if not gpu.mig_mode:
            pinned.append((f"gpu{index}", gpu.reading.uuid))
        elif gpu.mig_devices:
            pinned.extend((f"gpu{index}-mig{m.index}", m.uuid) for m in gpu.mig_devices)
        else:
            uuid = gpu.reading.uuid
            log.warning("GPU %d (%s) is in MIG mode with no MIG device; skipped", index, uuid)
    if not pinned:
        raise LaunchError(f"{where} found no GPU or MIG device to run an Ollama on")
    _, listen_port = parse_listen(config.listen)
    ports = (p for p in range(FIRST_PORT, 65536) if p != listen_port)
    return tuple(
        InstanceConfig(name=name, launcher="process", gpu=(uuid,), port=next(ports))
        for name, uuid in pinned
    )


def _resolve(
    config: Config,
    i: int,
    inst: InstanceConfig,
    ref: int | str,
    gpus: list[NvmlGpu] | None,
) -> int | str:
    path = f"instances[{i}].gpu"
    index = ref if isinstance(ref, int) else int(ref) if ref.isdigit() else None
    if gpus is None:
        if index is not None:
            log.warning(
                "%s (%s) stays GPU index %d: without NVML its UUID is unknown, and CUDA's "
                "numbering can change across boots; prefer the UUID from `nvidia-smi -L`",
                path, inst.name, index,
            )  # fmt: skip
        return ref
    if index is not None:
        for gpu in gpus:
            if gpu.reading.index == index:
                _warn_mig(inst, gpu)
                return gpu.reading.uuid
        raise ConfigError(
            f"this host has no GPU {index}; its GPUs are {_listing(gpus)}",
            source=config.source,
            path=path,
        )
    wanted = str(ref).lower()
    for gpu in gpus:
        if gpu.reading.uuid.lower() == wanted:
            _warn_mig(inst, gpu)
            return gpu.reading.uuid
        for mig in gpu.mig_devices:
            if mig.uuid.lower() == wanted:
                return mig.uuid
    raise ConfigError(
        f"{ref!r} is not a GPU of this host; its GPUs are {_listing(gpus)}",
        source=config.source,
        path=path,
    )


def _warn_mig(inst: InstanceConfig, gpu: NvmlGpu) -> None:
    if gpu.mig_mode:
        log.warning(
            "instance %s: GPU %d is in MIG mode, where CUDA sees only one MIG device; pin the "
            "instance to a MIG device UUID instead (`nvidia-smi -L` lists them)",
            inst.name, gpu.reading.index,
        )  # fmt: skip


def _listing(gpus: list[NvmlGpu]) -> str:
    parts = []
    for gpu in gpus:
        migs = "".join(f", MIG {m.index} {m.uuid}" for m in gpu.mig_devices)
        parts.append(f"{gpu.reading.index} ({gpu.reading.uuid}{migs})")
    return ", ".join(parts)


def _check_owners(config: Config, instances: list[InstanceConfig]) -> None:
    """After resolution an index and a UUID may turn out to be one GPU: each has one owner."""
    owner: dict[str, int] = {}
    for i, inst in enumerate(instances):
        if inst.launcher not in LOCAL:
            continue
        for ref in inst.gpu:
            key = str(ref)
            if key in owner and owner[key] != i and not inst.spread:
                raise ConfigError(
                    f"GPU {key} is already owned by instances[{owner[key]}] (the same GPU, once "
                    "by index and once by UUID); each GPU belongs to one instance",
                    source=config.source,
                    path=f"instances[{i}].gpu",
                )
            owner.setdefault(key, i)
