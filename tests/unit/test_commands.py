"""`proxy/commands/`: one module per `ollamux` subcommand, found in one guess, cheap to import."""

from __future__ import annotations

import json
import subprocess
import sys

from proxy import commands
from proxy.cli import COMMANDS, build_parser
from tests.processes import REPO, ollamux_env

HEAVY = ("yaml", "aiohttp.web", "pynvml", "proxy.config", "proxy.app", "proxy.emulator")
"""What only running a command needs: building the parser must not import it."""


def test_each_subcommand_is_the_module_of_its_name() -> None:
    """`ollamux X` is `proxy/commands/X.py`, or `X_*.py` where a module elsewhere holds `X`."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    names = list(subparsers.choices)  # type: ignore[arg-type]
    assert names == [c.NAME for c in COMMANDS]  # --help lists them in COMMANDS' order
    for command in COMMANDS:
        module = command.__name__.rpartition(".")[2]  # type: ignore[attr-defined]
        assert module == command.NAME or module.startswith(command.NAME + "_"), module
        if module != command.NAME:  # the package's docstring says why
            assert f"``{module}.py``" in (commands.__doc__ or "")


def test_every_module_in_commands_is_a_command() -> None:
    files = {p.stem for p in (REPO / "proxy" / "commands").glob("*.py")} - {"__init__"}
    listed = {c.__name__.rpartition(".")[2] for c in COMMANDS}  # type: ignore[attr-defined]
    assert files == listed


def test_building_the_parser_imports_nothing_heavy() -> None:
    """`ollamux --version` and every `--help` stay quick: each command imports its work in run()."""
    code = (
        "import json, sys\n"
        "from proxy.cli import build_parser\n"
        "build_parser()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=ollamux_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(result.stdout)
    assert [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)] == []
