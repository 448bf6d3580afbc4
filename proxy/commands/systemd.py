"""`ollamux systemd render|install|uninstall|status`: run the instances and the proxy as units.

The work is a library's: :mod:`proxy.instances.unit_files` renders the units as text and
:mod:`proxy.instances.systemctl` writes them, runs systemctl and keeps the install manifest (the
running proxy uses it too, to restart a systemd instance).
"""

from __future__ import annotations

import argparse

from proxy.cli_help import Subparsers

__all__ = ["NAME", "register", "run"]

NAME = "systemd"


def register(commands: Subparsers) -> None:
    """``systemd`` and its actions: render, install, uninstall, status."""
    systemd = commands.add_parser(NAME, help="run the instances and proxy as systemd units")
    actions = systemd.add_subparsers(dest="systemd_command", metavar="ACTION", required=True)
    render = actions.add_parser("render", help="write the units, env files and proxy config to DIR")
    render.add_argument("--config", metavar="FILE", required=True, help="the ollamux config")
    render.add_argument(
        "--out", metavar="DIR", required=True, help="write the files here, to read them"
    )
    install = actions.add_parser(
        "install", help="install and start the units; disable the stock ollama.service"
    )
    install.add_argument(
        "--config",
        metavar="FILE",
        required=True,
        help="the ollamux config; the proxy's own goes to /etc/ollamux/ollamux.yaml",
    )
    uninstall = actions.add_parser(
        "uninstall",
        help="undo install: stop and remove the units, restore ollama.service",
        description="Undo `ollamux systemd install` as its manifest (/etc/ollamux/installed.json) "
        "records it: stop and disable the units, remove the files, restore ollama.service.",
    )
    for sub, verb in ((install, "install into"), (uninstall, "uninstall from")):
        sub.add_argument("--dry-run", action="store_true", help="print every step, do nothing")
        sub.add_argument(
            "--root",
            metavar="DIR",
            default="/",
            help=f"{verb} a system image at DIR (files and enable/disable only; default: /)",
        )
    state = actions.add_parser("status", help="systemctl's view of ollamux's units")
    state.add_argument("--config", metavar="FILE", help="list this config's instance units")


def run(args: argparse.Namespace) -> None:
    """The action; OllamuxError with systemctl's words when a step fails."""
    from proxy.instances import systemctl

    if args.systemd_command == "render":
        systemctl.render_to(args.config, args.out)
    elif args.systemd_command == "install":
        systemctl.install(args.config, root=args.root, dry_run=args.dry_run)
    elif args.systemd_command == "uninstall":
        systemctl.uninstall(root=args.root, dry_run=args.dry_run)
    else:
        systemctl.status(args.config)
