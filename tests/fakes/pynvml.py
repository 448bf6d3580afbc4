"""A fake ``pynvml`` (nvidia-ml-py) for tests: the GPUs come from ``$FAKE_NVML`` (JSON).

Put ``tests/fakes`` first on ``PYTHONPATH`` (a subprocess) or in ``sys.modules`` (in process).
``$FAKE_NVML`` unset means no driver (``nvmlInit`` fails as without libnvidia-ml.so.1); else::

    {"error": null | "driver_not_loaded" | "no_permission",
     "gpus": [{"uuid": "GPU-...", "name": "NVIDIA L40S", "total": 48e9, "used": 1e9,
               "util": 37, "mig": null | false | true,
               "migs": [{"uuid": "MIG-...", "name": "...", "total": ..., "used": ...}],
               "processes": [{"pid": 42, "used": 1e9}]}]}

Only the functions ollamux calls exist; they raise ``NVMLError`` as the real module does.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_DEVICE_MIG_ENABLE = 1

_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
}
_ERRORS = {
    "driver_not_loaded": NVML_ERROR_DRIVER_NOT_LOADED,
    "no_permission": NVML_ERROR_NO_PERMISSION,
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _TEXT.get(self.value, f"error {self.value}")


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


_state: dict[str, Any] = {"inits": 0, "gpus": []}


def nvmlInit() -> None:
    raw = os.environ.get("FAKE_NVML")
    if raw is None:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    spec = json.loads(raw)
    if spec.get("error"):
        raise NVMLError(_ERRORS[spec["error"]])
    _state["gpus"] = spec.get("gpus", [])
    _state["inits"] += 1


def nvmlShutdown() -> None:
    _live()
    _state["inits"] -= 1


def nvmlDeviceGetCount() -> int:
    return len(_live())


def nvmlDeviceGetHandleByIndex(index: int) -> dict[str, Any]:
    gpus = _live()
    if not 0 <= index < len(gpus):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return dict(gpus[index])


def nvmlDeviceGetUUID(handle: dict[str, Any]) -> str:
    return str(handle["uuid"])


def nvmlDeviceGetName(handle: dict[str, Any]) -> str:
    return str(handle.get("name", "NVIDIA Fake"))


def nvmlDeviceGetMemoryInfo(handle: dict[str, Any]) -> SimpleNamespace:
    total, used = int(handle["total"]), int(handle.get("used", 0))
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: dict[str, Any]) -> SimpleNamespace:
    if handle.get("mig") or handle.get("is_mig"):
        raise NVMLError_NotSupported()
    return SimpleNamespace(gpu=int(handle.get("util", 0)), memory=0)


def nvmlDeviceGetMigMode(handle: dict[str, Any]) -> list[int]:
    if handle.get("mig") is None:
        raise NVMLError_NotSupported()
    mode = NVML_DEVICE_MIG_ENABLE if handle["mig"] else 0
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(handle: dict[str, Any]) -> int:
    return 7 if handle.get("mig") else 0


def nvmlDeviceGetMigDeviceHandleByIndex(handle: dict[str, Any], index: int) -> dict[str, Any]:
    migs = handle.get("migs", [])
    if index >= len(migs) or migs[index] is None:
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return {**migs[index], "is_mig": True}


def nvmlDeviceGetComputeRunningProcesses(
    handle: dict[str, Any],
) -> list[SimpleNamespace]:
    found = handle.get("processes", [])
    return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p.get("used")) for p in found]


def _live() -> list[dict[str, Any]]:
    if _state["inits"] <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    gpus: list[dict[str, Any]] = _state["gpus"]
    return gpus
