"""The `ollamux` command line: the top-level parser, one module per subcommand, errors mapped.

Each subcommand is a module of :mod:`proxy.commands` (`ollamux X` is ``proxy/commands/X.py``):
:data:`COMMANDS` lists them in the order ``--help`` shows them. This is the one place where ollamux
errors become messages on stderr and exit codes: a ConfigError (or a bad argument) exits 2, any
other OllamuxError exits 1, Ctrl-C exits 130; none of them prints a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Protocol

from proxy import __version__
from proxy.cli_help import Subparsers, add_global_flags, finish
from proxy.commands import (
    agent,
    config_check,
    demo,
    emulate,
    gpus,
    instances_cli,
    keys,
    plan,
    serve,
    status,
    systemd,
)
from proxy.errors import ConfigError, OllamuxError
from proxy.logs import setup_logging

__all__ = ["COMMANDS", "build_parser", "main"]

PROG = "ollamux"


class Command(Protocol):
    """What a module of :mod:`proxy.commands` has."""

    NAME: str
    """The subcommand, e.g. ``"serve"``."""

    def register(self, commands: Subparsers) -> None:
        """Add the subcommand's parser (help, flags, actions)."""

    def run(self, args: argparse.Namespace) -> None:
        """Do it; an OllamuxError when it cannot."""


COMMANDS: tuple[Command, ...] = (
    config_check,
    plan,
    serve,
    demo,
    emulate,
    status,
    agent,
    gpus,
    systemd,
    instances_cli,
    keys,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load-balancing reverse proxy for Ollama: one Ollama server per GPU.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_global_flags(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    finish(parser)  # every subcommand: the global flags, an example and the exit codes in --help
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, environ=os.environ)
    command = next(c for c in COMMANDS if args.command == c.NAME)
    try:
        command.run(args)
    except ConfigError as exc:
        for problem in exc.problems:  # each on its own line: every problem is found at once
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    except OllamuxError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
