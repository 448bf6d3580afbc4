"""`ollamux demo`: the emulated 4-GPU box shipped in the package, started from any install.

The box is ``demo.yaml`` of the package data (``proxy/data/``, the same file as the checkout's
``config/demo.yaml``), found through :mod:`importlib.resources`, so a wheel without the repository
runs it too. ``--listen HOST:PORT`` moves the whole box: the emulated instances take the four
ports after the proxy's (11434 gives the file's 11435-11438), so a second demo needs one flag.

Every port is checked before anything starts; one already held stops the demo with the port, its
holder and the fix, instead of proxying to another demo's instances.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cli_help import Subparsers
from proxy.errors import ConfigError

if TYPE_CHECKING:  # the parser is built for every command: the rest loads on use
    from proxy.config import Config

__all__ = ["DEMO_FIX", "NAME", "demo_config", "register", "run", "shipped_config"]

NAME = "demo"

DEMO_FIX = (
    "stop the other demo, or pass --listen HOST:PORT "
    "(the demo's instances take the 4 ports after it)"
)


def register(commands: Subparsers) -> None:
    """``demo [--listen HOST:PORT]``."""
    demo = commands.add_parser(
        NAME,
        help="start the emulated 4-GPU demo box (no GPU or Ollama needed)",
        description="Start the emulated demo box shipped with ollamux: 4 emulated GPUs "
        "(2 x 24 GiB, 2 x 48 GiB), one emulated Ollama each, and the routing proxy in front. "
        "Example: ollamux demo --listen 127.0.0.1:12000",
    )
    demo.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="the proxy's address (default: 127.0.0.1:11434); the 4 instances take the ports "
        "after it",
    )


def run(args: argparse.Namespace) -> None:
    """Check every port of the box, then serve it until stopped."""
    from proxy.instances.fleet import check_ports, serve

    with shipped_config() as path:
        config = demo_config(path, args.listen)
        check_ports(config, fix=DEMO_FIX)
        serve(config)


@contextlib.contextmanager
def shipped_config(name: str = "demo.yaml") -> Iterator[Path]:
    """A path to the packaged config ``name`` (``demo.yaml``, ``example.yaml``) while open."""
    from importlib import resources

    resource = resources.files("proxy") / "data" / name
    with resources.as_file(resource) as path:  # a real file even from a zipped install
        yield path


def demo_config(path: Path, listen: str | None = None) -> Config:
    """The demo box from ``path``, moved to ``listen`` with its instances on the next ports."""
    from proxy.config import load_config, parse_listen

    config = load_config(path)
    if listen is None or config.instances == "auto":
        return config
    try:
        _, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(str(exc), path="--listen") from None
    count = len(config.instances)
    if port + count > 65535:
        raise ConfigError(
            f"port {port} leaves no room for the {count} instances after it; "
            f"use a port up to {65535 - count}",
            path="--listen",
        )
    instances = tuple(
        dataclasses.replace(inst, port=port + i) for i, inst in enumerate(config.instances, start=1)
    )
    return dataclasses.replace(config, listen=listen, instances=instances)
