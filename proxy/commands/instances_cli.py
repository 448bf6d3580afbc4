"""`ollamux instances`: list, drain, undrain and restart the instances of a running proxy.

It speaks to the proxy's admin API (:mod:`proxy.api.instance_admin`), with the admin token from
``--token`` or ``$OLLAMUX_ADMIN_TOKEN`` when the proxy wants one. Not named ``instances.py``: that
is the name of the package :mod:`proxy.instances` (how instances come to exist), and no two modules
share a name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Literal, TextIO

from proxy.cli_help import URL_HELP, Subparsers
from proxy.errors import ConfigError, OllamuxError
from proxy.proxy_client import call, normalize_url

__all__ = ["NAME", "TOKEN_ENV", "Action", "register", "run", "run_instances", "table"]

NAME = "instances"
TOKEN_ENV = "OLLAMUX_ADMIN_TOKEN"

Action = Literal["list", "drain", "undrain", "restart"]


def register(commands: Subparsers) -> None:
    """``instances [list|drain|undrain|restart NAME]``; every level takes --url, --token, --json."""
    instances = commands.add_parser(
        NAME,
        help="list, drain, undrain or restart the instances of a running proxy",
        description="List the instances of a running proxy (the default action), or drain "
        "(no new requests; those in flight finish), undrain or restart one of them.",
    )
    instances.set_defaults(name=None, wait=False)
    actions = instances.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="the instances, their state and load")
    drain = actions.add_parser("drain", help="send no new requests to NAME; those in flight finish")
    drain.add_argument(
        "--wait", action="store_true", help="return only when nothing is in flight on NAME"
    )
    undrain = actions.add_parser("undrain", help="route requests to NAME again")
    restart = actions.add_parser(
        "restart", help="stop and start NAME (a process or systemd instance)"
    )
    for sub in (drain, undrain, restart):
        sub.add_argument("name", metavar="NAME", help="the instance, as `ollamux instances` lists")
    for sub in (instances, listing, drain, undrain, restart):
        default = argparse.SUPPRESS if sub is not instances else None
        sub.add_argument("--url", default=default, help=URL_HELP)
        sub.add_argument(
            "--token",
            default=argparse.SUPPRESS if sub is not instances else "",
            help="the proxy's admin_token (default: $OLLAMUX_ADMIN_TOKEN)",
        )
        sub.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS if sub is not instances else False,
            help="print the API's JSON",
        )


def run(args: argparse.Namespace) -> None:
    """The action (``list`` if none is given) on the proxy at ``--url``, else the environment's."""
    from proxy.ollama_host import url_from_env

    run_instances(
        args.url or url_from_env(os.environ),
        args.action or "list",
        args.name,
        token=args.token or os.environ.get(TOKEN_ENV, ""),
        wait=args.wait,
        as_json=args.json,
    )


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
