"""The `ollamux` command line: parses arguments, calls one function per subcommand, maps errors.

This is the one place where ollamux errors become messages on stderr and exit codes:
a ConfigError (or a bad argument) exits 2, any other OllamuxError exits 1, Ctrl-C exits 130;
none of them prints a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.errors import ConfigError, OllamuxError

__all__ = ["build_parser", "main"]

PROG = "ollamux"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load-balancing reverse proxy for Ollama: one Ollama server per GPU.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default: info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="work with config files")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser(
        "check", help="validate a config file and print it resolved (defaults, ports, models)"
    )
    check.add_argument("file", metavar="FILE")

    serve = commands.add_parser("serve", help="start every instance of a config and keep them up")
    serve.add_argument("--config", metavar="FILE", help="config file (e.g. config/demo.yaml)")
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="the proxy's address (overrides listen)"
    )

    emulate = commands.add_parser(
        "emulate",
        help="run one emulated Ollama server",
        description="Run one emulated Ollama server. Settings not given as flags come from the "
        "config instance, else from OLLAMA_* environment variables, else Ollama's defaults.",
    )
    emulate.add_argument("--listen", metavar="HOST:PORT", help="default: 127.0.0.1:11434")
    emulate.add_argument(
        "--gpu",
        dest="gpus",
        action="append",
        default=[],
        metavar="NAME:GIB[:SPEED]",
        help="an emulated GPU, e.g. rtx4090:24; repeat for one server over several GPUs",
    )
    emulate.add_argument("--config", metavar="FILE", help="take GPUs and settings from this config")
    emulate.add_argument("--instance", metavar="NAME", help="the config's emulated instance")
    emulate.add_argument("--speed", type=float, help="time compression, e.g. 20 (default: 1)")
    emulate.add_argument("--num-parallel", type=int, metavar="N", help="OLLAMA_NUM_PARALLEL")
    emulate.add_argument(
        "--keep-alive", metavar="DURATION", help="OLLAMA_KEEP_ALIVE, e.g. 5m or -1"
    )
    emulate.add_argument(
        "--max-loaded-models", type=int, metavar="N", help="OLLAMA_MAX_LOADED_MODELS"
    )
    emulate.add_argument("--max-queue", type=int, metavar="N", help="OLLAMA_MAX_QUEUE")
    emulate.add_argument("--context-length", type=int, metavar="N", help="OLLAMA_CONTEXT_LENGTH")
    emulate.add_argument(
        "--spread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="OLLAMA_SCHED_SPREAD: split every model over all GPUs",
    )
    emulate.add_argument("--models-dir", metavar="DIR", help="model store (default: in memory)")
    emulate.add_argument(
        "--seed", type=int, metavar="N", help="emulator.seed: varies the generated text"
    )
    emulate.add_argument(
        "--quiet", action="store_true", help="no log line per request (serve passes it)"
    )

    status = commands.add_parser(
        "status", help="show a running proxy: GPUs, loaded models, queues, recent requests"
    )
    status.add_argument(
        "--url",
        default=os.environ.get("OLLAMUX_URL", "http://127.0.0.1:11434"),
        help="the proxy (default: $OLLAMUX_URL, else http://127.0.0.1:11434)",
    )
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="with --watch")
    status.add_argument("--json", action="store_true", help="print /proxy/status as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        _dispatch(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OllamuxError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    # Subcommand modules are imported on use, so `--version` and `config check` stay light.
    if args.command == "config":
        from proxy.config_dump import check_config

        sys.stdout.write(check_config(args.file))
    elif args.command == "serve":
        from proxy.config import Config, load_config
        from proxy.instances.fleet import serve

        serve(load_config(args.config) if args.config else Config(), listen=args.listen)
    elif args.command == "status":
        from proxy.status import run_status

        run_status(args.url, watch=args.watch, as_json=args.json, interval=args.interval)
    elif args.command == "emulate":
        from proxy.emulator.launch import EmulateOptions, emulate

        options = EmulateOptions(
            listen=args.listen,
            gpus=tuple(args.gpus),
            config=args.config,
            instance=args.instance,
            speed=args.speed,
            num_parallel=args.num_parallel,
            keep_alive=args.keep_alive,
            max_loaded_models=args.max_loaded_models,
            max_queue=args.max_queue,
            context_length=args.context_length,
            spread=args.spread,
            models_dir=args.models_dir,
            seed=args.seed,
            quiet=args.quiet,
        )
        emulate(options, os.environ)
