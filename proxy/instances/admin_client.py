"""`ollamux instances`: list, drain, undrain and restart the instances of a running proxy.

It speaks to the proxy's admin API (:mod:`proxy.api.instance_admin`), with the admin token from
``--token`` or ``$OLLAMUX_ADMIN_TOKEN`` when the proxy wants one.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Literal, TextIO

from proxy.errors import ConfigError, OllamuxError
from proxy.proxy_client import call, normalize_url

__all__ = ["Action", "run_instances"]

Action = Literal["list", "drain", "undrain", "restart"]


def run_instances(
    url: str,
    action: Action = "list",
    name: str | None = None,
    *,
    token: str = "",
    wait: bool = False,
    as_json: bool = False,
    timeout: float = 300.0,
    out: TextIO | None = None,
) -> None:
    """Do ``action`` (on instance ``name``) and print the result; OllamuxError if refused."""
    out = out or sys.stdout
    base = normalize_url(url)
    if action == "list":
        data = call(base, "GET", "/proxy/instances", token=token, timeout=10)
        out.write(json.dumps(data, indent=2) + "\n" if as_json else table(data["instances"]))
        return
    if not name:
        raise ConfigError(f"`ollamux instances {action}` needs the instance's name", path="NAME")
    path = f"/proxy/instances/{name}/{action}"
    entry = call(base, "POST", path, token=token, timeout=timeout, argument="NAME")
    if action == "drain" and wait:
        entry = _wait_drained(base, name, token, entry, out, timeout=timeout)
    if as_json:
        out.write(json.dumps(entry, indent=2) + "\n")
    else:
        out.write(f"{_verb(action)} {name}: {entry['state']}, {entry['inflight']} in flight\n")


def table(instances: list[dict[str, Any]]) -> str:
    rows = [("INSTANCE", "STATE", "LAUNCHER", "BUSY", "URL", "GPUS", "PROCESS")]
    for inst in instances:
        rows.append(
            (
                str(inst["name"]),
                str(inst["state"]),
                str(inst.get("launcher", "")),
                f"{inst['inflight']}/{inst['slots']}",
                str(inst["url"]),
                ",".join(inst.get("gpus", [])) or "-",
                str(inst.get("process", "")) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def _verb(action: str) -> str:
    return {"drain": "draining", "undrain": "undrained", "restart": "restarted"}[action]


def _wait_drained(
    base: str, name: str, token: str, entry: dict[str, Any], out: TextIO, *, timeout: float
) -> dict[str, Any]:
    """Poll until ``name`` has nothing in flight (the drain is complete)."""
    deadline = time.monotonic() + timeout
    while entry["inflight"] > 0:
        if time.monotonic() > deadline:
            raise OllamuxError(f"{name} still has {entry['inflight']} in flight after {timeout} s")
        out.write(f"waiting: {name} has {entry['inflight']} request(s) in flight\n")
        time.sleep(1.0)
        listed = call(base, "GET", "/proxy/instances", token=token, timeout=10)["instances"]
        entry = next(i for i in listed if i["name"] == name)
    return entry
