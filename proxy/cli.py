"""The `ollamux` command line: parses arguments, calls one function per subcommand, maps errors.

This is the one place where ollamux errors become messages on stderr and exit codes:
a ConfigError (or a bad argument) exits 2, any other OllamuxError exits 1, Ctrl-C exits 130;
none of them prints a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.cli_help import add_global_flags, finish
from proxy.errors import ConfigError, OllamuxError
from proxy.logs import setup_logging

__all__ = ["build_parser", "main"]

PROG = "ollamux"
URL_HELP = (
    "the proxy (default: $OLLAMUX_URL, else $OLLAMA_HOST as the ollama CLI reads it, "
    "else http://127.0.0.1:11434)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load-balancing reverse proxy for Ollama: one Ollama server per GPU.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_global_flags(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="work with config files")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser(
        "check", help="validate a config file and print it resolved (defaults, ports, models)"
    )
    check.add_argument("file", metavar="FILE", help="the YAML config file")

    serve = commands.add_parser(
        "serve",
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

    demo = commands.add_parser(
        "demo",
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

    emulate = commands.add_parser(
        "emulate",
        help="run one emulated Ollama server",
        description="Run one emulated Ollama server. Settings not given as flags come from the "
        "config instance, else from OLLAMA_* environment variables, else Ollama's defaults.",
    )
    emulate.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="default: the --instance's port, else $OLLAMA_HOST as Ollama reads it, "
        "else 127.0.0.1:11434",
    )
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
    status.add_argument("--url", help=URL_HELP)
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="with --watch (default: 2)"
    )
    status.add_argument("--json", action="store_true", help="print /proxy/status as JSON")
    agent = commands.add_parser(
        "agent",
        help="serve this host's GPU memory (NVML) as GET /gpus for a proxy on another host",
        description="Serve this host's NVIDIA GPUs, read with NVML, as GET /gpus in the shape "
        "the proxy reads (an external instance's gpu_source: http://HOST:11433), until Ctrl-C "
        "or SIGTERM. Exits 1 when NVML reads no GPU.",
    )
    agent.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="default: 127.0.0.1:11433; use 0.0.0.0:11433 to let a proxy on another host read it",
    )
    agent.add_argument(
        "--token",
        default="",
        help="require Authorization: Bearer TOKEN on /gpus (default: $OLLAMUX_AGENT_TOKEN; "
        "the variable keeps it out of the process list)",
    )
    _add_instance_commands(commands)
    from proxy.keys_cli import add_parser as add_keys_parser

    add_keys_parser(commands)  # `keys add|list|revoke`
    finish(parser)  # every subcommand: the global flags, an example and the exit codes in --help
    return parser


def _add_instance_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`gpus`, `systemd ...` and `instances ...`: the per-GPU instances on this host."""
    gpus = commands.add_parser("gpus", help="list this host's NVIDIA GPUs (NVML)")
    gpus.add_argument("--json", action="store_true", help="JSON in the shape of GET /gpus")

    systemd = commands.add_parser("systemd", help="run the instances and proxy as systemd units")
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

    instances = commands.add_parser(
        "instances",
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, environ=os.environ)
    try:
        _dispatch(args)
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


def _dispatch(args: argparse.Namespace) -> None:
    # Subcommand modules are imported on use, so `--version` and `config check` stay light.
    if args.command == "config":
        from proxy.config_dump import check_config

        sys.stdout.write(check_config(args.file))
    elif args.command == "serve":
        from proxy.instances.backends import serve_config
        from proxy.instances.fleet import serve

        serve(serve_config(args.config, args.backends, args.num_parallel), listen=args.listen)
    elif args.command == "demo":
        from proxy.demo import run_demo

        run_demo(listen=args.listen)
    elif args.command == "agent":
        from proxy.commands.agent import TOKEN_ENV, run_agent

        run_agent(args.listen, token=args.token or os.environ.get(TOKEN_ENV, ""))
    elif args.command == "gpus":
        from proxy.gpu.report import run_gpus

        run_gpus(as_json=args.json)
    elif args.command == "systemd":
        _systemd(args)
    elif args.command == "instances":
        from proxy.instances.admin_client import run_instances
        from proxy.ollama_host import url_from_env

        run_instances(
            args.url or url_from_env(os.environ),
            args.action or "list",
            args.name,
            token=args.token or os.environ.get("OLLAMUX_ADMIN_TOKEN", ""),
            wait=args.wait,
            as_json=args.json,
        )
    elif args.command == "keys":
        from proxy.keys_cli import run_keys

        run_keys(args)
    elif args.command == "status":
        from proxy.ollama_host import url_from_env
        from proxy.status import run_status

        url = args.url or url_from_env(os.environ)
        run_status(url, watch=args.watch, as_json=args.json, interval=args.interval)
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


def _systemd(args: argparse.Namespace) -> None:
    from proxy.instances import systemctl

    if args.systemd_command == "render":
        systemctl.render_to(args.config, args.out)
    elif args.systemd_command == "install":
        systemctl.install(args.config, root=args.root, dry_run=args.dry_run)
    elif args.systemd_command == "uninstall":
        systemctl.uninstall(root=args.root, dry_run=args.dry_run)
    else:
        systemctl.status(args.config)
