"""NVIDIA GPUs through NVML (nvidia-ml-py): discovery for `ollamux gpus`, and the router's source.

:func:`discover` lists every GPU with its index, UUID, name, memory, utilization, MIG mode, MIG
devices and compute processes; the base keys of :meth:`NvmlGpu.to_json` are exactly those of the
emulator's ``GET /gpus`` (:class:`~proxy.gpu.GpuReading`), so the two are interchangeable.
:class:`NvmlGpuSource` is the :class:`~proxy.gpu.GpuSource` of the instances ollamux runs on this
host (``process`` and ``systemd``); it reads physical GPUs and MIG devices, each under its own UUID.

Without a driver, without the NVML library or without a GPU, :func:`discover` raises
:class:`~proxy.errors.GpuUnavailable` with one sentence saying which and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.errors import GpuUnavailable
from proxy.gpu import GpuReading

__all__ = [
    "GpuProcess",
    "MigDevice",
    "NvmlGpu",
    "NvmlGpuSource",
    "discover",
    "local_gpu_source",
]

log = logging.getLogger("ollamux.gpu")

# NVML's return codes (nvml.h); the module's own constants are used when it has them.
_LIBRARY_NOT_FOUND = 12
_DRIVER_NOT_LOADED = 9
_NO_PERMISSION = 4
_MIG_ENABLE = 1


@dataclass(frozen=True, kw_only=True)
class GpuProcess:
    """A process with a CUDA context on a GPU."""

    pid: int
    used_memory: int | None
    """Bytes, or None where NVML cannot tell (e.g. inside a container)."""
    name: str = ""


@dataclass(frozen=True, kw_only=True)
class MigDevice:
    """One MIG device of a GPU in MIG mode; CUDA_VISIBLE_DEVICES takes its ``MIG-`` UUID."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_free: int


@dataclass(frozen=True, kw_only=True)
class NvmlGpu:
    """One physical GPU as NVML reports it."""

    reading: GpuReading
    mig_mode: bool | None
    """Current MIG mode; None where the GPU cannot do MIG."""
    mig_devices: tuple[MigDevice, ...] = ()
    processes: tuple[GpuProcess, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """``GET /gpus``'s keys, then ``mig_mode``, ``mig_devices`` and ``processes``."""
        return {
            **dataclasses.asdict(self.reading),
            "mig_mode": self.mig_mode,
            "mig_devices": [dataclasses.asdict(m) for m in self.mig_devices],
            "processes": [dataclasses.asdict(p) for p in self.processes],
        }

    def readings(self) -> list[GpuReading]:
        """The GPU itself and each MIG device (under the GPU's index, with its own UUID)."""
        out = [self.reading]
        for mig in self.mig_devices:
            out.append(
                GpuReading(
                    index=self.reading.index,
                    uuid=mig.uuid,
                    name=mig.name,
                    memory_total=mig.memory_total,
                    memory_used=mig.memory_used,
                    memory_free=mig.memory_free,
                    utilization=0.0,  # NVML does not report utilization per MIG device
                )
            )
        return out


def discover(*, processes: bool = True) -> list[NvmlGpu]:
    """Every NVIDIA GPU of this host, by NVML index; GpuUnavailable when there is none to read."""
    with _session() as nvml:
        try:
            count = int(nvml.nvmlDeviceGetCount())
            gpus = [_read_gpu(nvml, i, processes=processes) for i in range(count)]
        except nvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML could not read the GPUs ({_text(exc)})") from None
    if not gpus:
        raise GpuUnavailable(
            "NVML works but reports no NVIDIA GPU on this host; check `nvidia-smi -L`"
        )
    return gpus


class NvmlGpuSource:
    """The router's GPU source for instances on this host: NVML, initialized once, read in a thread.

    Reads raise OSError, as the :class:`~proxy.gpu.GpuSource` protocol asks.
    """

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    async def read(self) -> list[GpuReading]:
        return await asyncio.to_thread(self._read)

    def _read(self) -> list[GpuReading]:
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
            gpus = [_read_gpu(nvml, i, processes=False) for i in range(count)]
        except nvml.NVMLError as exc:
            raise OSError(f"NVML: {_text(exc)}") from None
        return [reading for gpu in gpus for reading in gpu.readings()]


async def local_gpu_source() -> NvmlGpuSource | None:
    """An NVML source if NVML works here, else None (with one warning saying why)."""

    def start() -> NvmlGpuSource | None:
        try:
            nvml = _module()
        except GpuUnavailable as exc:
            log.warning("no GPU memory readings for the local instances: %s", exc)
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            log.warning("no GPU memory readings for the local instances: %s", _why_not(exc))
            return None
        # NVML stays initialized for the life of the process; the kernel cleans up on exit.
        return NvmlGpuSource(nvml)

    return await asyncio.to_thread(start)


# --- NVML calls ----------------------------------------------------------------------------------


def _module() -> Any:
    """The ``pynvml`` module (nvidia-ml-py), typed as Any: it ships no type information."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise GpuUnavailable(
            "the Python package nvidia-ml-py (module pynvml) is not installed; "
            "install it with: pip install nvidia-ml-py"
        ) from None


@contextlib.contextmanager
def _session() -> Iterator[Any]:
    nvml = _module()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise GpuUnavailable(_why_not(exc)) from None
    try:
        yield nvml
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def _why_not(exc: BaseException) -> str:
    """One sentence for an nvmlInit failure: what is missing and what to do."""
    code = getattr(exc, "value", None)
    if code == _LIBRARY_NOT_FOUND:
        return (
            "no NVIDIA driver found (NVML's library libnvidia-ml.so.1 is missing), so this host "
            "has no NVIDIA GPU that ollamux can use; install the NVIDIA driver if it has one"
        )
    if code == _DRIVER_NOT_LOADED:
        return (
            "the NVIDIA driver is installed but not loaded (NVML: Driver Not Loaded); "
            "check `nvidia-smi`, load the driver or reboot"
        )
    if code == _NO_PERMISSION:
        return "NVML refused access to the GPUs (Insufficient Permissions); check /dev/nvidia*"
    return f"NVML could not start ({_text(exc)}); check `nvidia-smi`"


def _text(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # pynvml's __str__ calls into the library, which may be the problem
        return type(exc).__name__


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_gpu(nvml: Any, index: int, *, processes: bool) -> NvmlGpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
    except nvml.NVMLError:  # not supported in MIG mode and on some boards
        utilization = 0.0
    reading = GpuReading(
        index=index,
        uuid=_str(nvml.nvmlDeviceGetUUID(handle)),
        name=_str(nvml.nvmlDeviceGetName(handle)),
        memory_total=int(memory.total),
        memory_used=int(memory.used),
        memory_free=int(memory.free),
        utilization=utilization,
    )
    mig_mode = _mig_mode(nvml, handle)
    return NvmlGpu(
        reading=reading,
        mig_mode=mig_mode,
        mig_devices=_mig_devices(nvml, handle) if mig_mode else (),
        processes=_processes(nvml, handle) if processes else (),
    )


def _mig_mode(nvml: Any, handle: Any) -> bool | None:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # NOT_SUPPORTED: a GPU without MIG
        return None
    return int(current) == int(getattr(nvml, "NVML_DEVICE_MIG_ENABLE", _MIG_ENABLE))


def _mig_devices(nvml: Any, handle: Any) -> tuple[MigDevice, ...]:
    out = []
    for slot in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:  # NOT_FOUND: an empty slot
            continue
        memory = nvml.nvmlDeviceGetMemoryInfo(mig)
        out.append(
            MigDevice(
                index=slot,
                uuid=_str(nvml.nvmlDeviceGetUUID(mig)),
                name=_str(nvml.nvmlDeviceGetName(mig)),
                memory_total=int(memory.total),
                memory_used=int(memory.used),
                memory_free=int(memory.free),
            )
        )
    return tuple(out)


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    try:
        found = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:  # NOT_SUPPORTED on some boards, NO_PERMISSION for others' processes
        return ()
    out = []
    for proc in found:
        used = getattr(proc, "usedGpuMemory", None)
        out.append(
            GpuProcess(
                pid=int(proc.pid),
                used_memory=int(used) if isinstance(used, int) else None,
                name=_process_name(int(proc.pid)),
            )
        )
    return tuple(out)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # another PID namespace, or gone already
        return ""
