"""Every `ollamux` subcommand's global flags and the end of its --help: an example, the exit codes.

:func:`finish` walks the whole parser once it is built: each subcommand, at any depth, accepts the
global flags (``--log-level``, ``--log-format``) after its name as well as before it, and its help
ends with an example from :data:`EXAMPLES` and the exit codes the README documents.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import TypeAlias

__all__ = [
    "EXAMPLES",
    "EXIT_CODES",
    "URL_HELP",
    "HelpFormatter",
    "Subparsers",
    "add_global_flags",
    "finish",
    "subcommands",
]

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers`` returns: each command module's ``register`` adds its parser to it."""

URL_HELP = (
    "the proxy (default: $OLLAMUX_URL, else $OLLAMA_HOST as the ollama CLI reads it, "
    "else http://127.0.0.1:11434)"
)
"""The ``--url`` help of the commands that talk to a running proxy (status, instances)."""

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")

EXIT_CODES = (
    "exit codes: 0 success (a stop by Ctrl-C or SIGTERM included), 1 the command failed (an "
    "instance could not start, no NVIDIA GPU, the proxy cannot be reached), 2 an invalid config "
    "or argument (an unknown instance name included), 130 interrupted"
)

EXAMPLES: dict[str, str] = {
    "": "ollamux serve --config config/demo.yaml\n"
    "  ollamux serve --log-level debug --log-format json",
    "config": "ollamux config check /etc/ollamux/ollamux.yaml",
    "config check": "ollamux config check config/demo.yaml",
    "plan": "ollamux plan --model llama3.3:70b --model qwen2.5:32b --users 8 > ollamux.yaml\n"
    "  ollamux plan --gpu rtx4090:24 --gpu rtx4090:24 --gpu rtx4090:24 --gpu rtx4090:24 "
    "--model llama3.3:70b --model qwen2.5:32b",
    "serve": "ollamux serve --config /etc/ollamux/ollamux.yaml\n"
    "  ollamux serve                      # no config: one Ollama per NVIDIA GPU (NVML)\n"
    "  ollamux serve --backend http://10.0.0.5:11434 --backend http://10.0.0.6:11434 "
    "--num-parallel 2",
    "demo": "ollamux demo",
    "emulate": "ollamux emulate --listen 127.0.0.1:11501 --gpu rtx4090:24 --speed 20\n"
    "  OLLAMA_HOST=:11501 ollamux emulate --gpu rtx4090:24",
    "status": "ollamux status --watch\n  OLLAMA_HOST=gpu-box:11434 ollamux status --json",
    "gpus": "ollamux gpus --json",
    "agent": "OLLAMUX_AGENT_TOKEN=... ollamux agent --listen 0.0.0.0:11433\n"
    "  curl -H 'Authorization: Bearer ...' http://gpu-box-2:11433/gpus",
    "systemd": "sudo ollamux systemd install --config /etc/ollamux/ollamux.yaml",
    "systemd render": "ollamux systemd render --config ollamux.yaml --out ./units",
    "systemd install": "sudo ollamux systemd install --config /etc/ollamux/ollamux.yaml\n"
    "  ollamux systemd install --config ollamux.yaml --dry-run",
    "systemd uninstall": "sudo ollamux systemd uninstall\n  ollamux systemd uninstall --dry-run",
    "systemd status": "ollamux systemd status --config /etc/ollamux/ollamux.yaml",
    "instances": "ollamux instances\n  ollamux instances drain gpu1 --wait",
    "instances list": "ollamux instances list --url http://gpu-box:11434",
    "instances drain": "ollamux instances drain gpu1 --wait",
    "instances undrain": "ollamux instances undrain gpu1",
    "instances restart": "OLLAMUX_ADMIN_TOKEN=... ollamux instances restart gpu1",
    "keys": "ollamux keys add open-webui --config /etc/ollamux/ollamux.yaml",
    "keys add": "ollamux keys add open-webui --models llama3.2,qwen3:8b --config ollamux.yaml",
    "keys list": "ollamux keys list --config /etc/ollamux/ollamux.yaml",
    "keys revoke": "ollamux keys revoke open-webui --config /etc/ollamux/ollamux.yaml",
}


def add_global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--log-level`` and ``--log-format``; below the top they only override what was given."""
    default = argparse.SUPPRESS
    parser.add_argument(
        "--log-level",
        default="info" if top else default,
        choices=LOG_LEVELS,
        help="how much to log on stderr (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default="logfmt" if top else default,
        choices=LOG_FORMATS,
        help="logfmt: key=value lines; json: one JSON object a line (default: logfmt)",
    )


def subcommands(
    parser: argparse.ArgumentParser, name: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand below ``parser`` as (``"systemd install"``, its parser), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                path = f"{name} {sub_name}".strip()
                yield path, sub
                yield from subcommands(sub, path)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-line paragraph to the terminal; keeps one of several lines (an example) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [
            "\n".join(indent + line for line in part.splitlines())
            if "\n" in part
            else super(HelpFormatter, self)._fill_text(part, width, indent)
            for part in text.split("\n\n")
        ]
        return "\n\n".join(paragraphs)


def finish(parser: argparse.ArgumentParser) -> None:
    """Global flags on every subcommand; an example and the exit codes at the end of its help."""
    for path, sub in [("", parser), *subcommands(parser)]:
        if sub is not parser:
            add_global_flags(sub, top=False)
        sub.formatter_class = HelpFormatter
        example = EXAMPLES.get(path)
        lines = [f"example:\n  {example}"] if example else []
        sub.epilog = "\n\n".join([*lines, EXIT_CODES])
