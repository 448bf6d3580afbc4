"""`ollamux gpus`: this host's NVIDIA GPUs as a table, or as JSON in the shape of ``GET /gpus``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, TextIO

from proxy.cli_help import Subparsers

if TYPE_CHECKING:  # the parser is built for every command: NVML's module loads on use
    from proxy.gpu.nvml import NvmlGpu

__all__ = ["NAME", "gpus_json", "gpus_table", "register", "run", "run_gpus"]

NAME = "gpus"
GIB = 1024**3


def register(commands: Subparsers) -> None:
    """``gpus [--json]``."""
    gpus = commands.add_parser(NAME, help="list this host's NVIDIA GPUs (NVML)")
    gpus.add_argument("--json", action="store_true", help="JSON in the shape of GET /gpus")


def run(args: argparse.Namespace) -> None:
    run_gpus(as_json=args.json)


def run_gpus(*, as_json: bool = False, out: TextIO | None = None) -> None:
    """Print the GPUs; GpuUnavailable (exit 1, one sentence) when NVML finds none."""
    from proxy.gpu.nvml import discover

    gpus = discover()
    (out or sys.stdout).write(gpus_json(gpus) if as_json else gpus_table(gpus))


def gpus_json(gpus: list[NvmlGpu]) -> str:
    """``{"gpus": [...]}``: the keys of the emulator's /gpus, then MIG and processes."""
    return json.dumps({"gpus": [gpu.to_json() for gpu in gpus]}, indent=2) + "\n"


def gpus_table(gpus: list[NvmlGpu]) -> str:
    rows = [("GPU", "UUID", "NAME", "MEMORY USED/TOTAL", "FREE", "UTIL", "MIG", "PROCESSES")]
    for gpu in gpus:
        r = gpu.reading
        mig = {None: "n/a", False: "off", True: "on"}[gpu.mig_mode]
        procs = ", ".join(
            f"{p.pid} {p.name or '?'}" + (f" ({_gib(p.used_memory)})" if p.used_memory else "")
            for p in gpu.processes
        )
        rows.append(
            (
                str(r.index),
                r.uuid,
                r.name,
                f"{_gib(r.memory_used)} / {_gib(r.memory_total)}",
                _gib(r.memory_free),
                f"{r.utilization:.0%}",
                mig,
                procs or "-",
            )
        )
        for m in gpu.mig_devices:
            used = f"{_gib(m.memory_used)} / {_gib(m.memory_total)}"
            free = _gib(m.memory_free)
            rows.append((f"{r.index}:{m.index}", m.uuid, m.name, used, free, "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
