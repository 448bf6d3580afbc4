"""`ollamux serve`: start every instance of a config (or route to running servers) and keep them up.

The work is a library's: :func:`proxy.instances.backends.serve_config` makes the config (a file,
``--backend`` URLs, or one Ollama per NVIDIA GPU) and :func:`proxy.instances.fleet.serve` starts,
supervises and stops the instances and the proxy (the demo serves through it too).
"""

from __future__ import annotations

import argparse

from proxy.cli_help import Subparsers

__all__ = ["NAME", "register", "run"]

NAME = "serve"


def register(commands: Subparsers) -> None:
    """``serve [--config FILE | --backend URL ...] [--num-parallel N] [--listen HOST:PORT]``."""
    serve = commands.add_parser(
        NAME,
        help="start every instance of a config and keep them up",
        description="Start every instance of a config, wait until each answers, route requests "
        "to them on the config's listen address, and keep them up until Ctrl-C or SIGTERM. "
        "With --backend instead of --config: route to Ollama servers that already run. "
        "With neither: one Ollama per NVIDIA GPU found with NVML, on 127.0.0.1:11434.",
    )
    serve.add_argument("--config", metavar="FILE", help="config file (e.g. config/demo.yaml)")
    serve.add_argument(
        "--backend",
        dest="backends",
        action="append",
        default=[],
        metavar="URL",
        help="an Ollama server that already runs, e.g. http://10.0.0.5:11434; repeat for each "
        "(no config file: each is an external instance named HOST-PORT)",
    )
    serve.add_argument(
        "--num-parallel",
        type=int,
        metavar="N",
        help="the --backend servers' OLLAMA_NUM_PARALLEL (default: 1, with a warning)",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="the proxy's address (overrides the config's listen; OLLAMA_HOST is not read, "
        "since the instances behind the proxy are the Ollama servers)",
    )


def run(args: argparse.Namespace) -> None:
    """Serve until Ctrl-C or SIGTERM; ConfigError or LaunchError when it cannot start."""
    from proxy.instances.backends import serve_config
    from proxy.instances.fleet import serve

    serve(serve_config(args.config, args.backends, args.num_parallel), listen=args.listen)
