"""`ollamux config check FILE`: validate a config file and print it resolved, as YAML.

Named ``config_check`` because ``proxy/config.py`` (the config's dataclasses and loader) holds the
name ``config``; ``check`` is the only ``config`` action. The YAML comes from
:func:`proxy.config_dump.dump_config`, which systemd rendering uses too.
"""

from __future__ import annotations

import argparse
import sys

from proxy.cli_help import Subparsers

__all__ = ["NAME", "register", "run"]

NAME = "config"


def register(commands: Subparsers) -> None:
    """``config check FILE``."""
    config = commands.add_parser(NAME, help="work with config files")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate a config file and print it resolved (defaults, ports, models)"
    )
    check.add_argument("file", metavar="FILE", help="the YAML config file")


def run(args: argparse.Namespace) -> None:
    """Print the config resolved; ConfigError (exit 2) naming every problem when it is invalid."""
    from proxy.config import load_config
    from proxy.config_dump import dump_config

    sys.stdout.write(dump_config(load_config(args.file)))
