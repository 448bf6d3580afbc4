"""`ollamux emulate`: run one emulated Ollama server.

The flags become an :class:`~proxy.emulator.launch.EmulateOptions`; the library
:mod:`proxy.emulator.launch` merges them with a config instance and the ``OLLAMA_*`` variables
(``plan_emulator``, which the tests call directly) and serves the emulator.
"""

from __future__ import annotations

import argparse
import os

from proxy.cli_help import Subparsers

__all__ = ["NAME", "register", "run"]

NAME = "emulate"


def register(commands: Subparsers) -> None:
    """``emulate``: one flag per setting of the emulated server."""
    emulate = commands.add_parser(
        NAME,
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


def run(args: argparse.Namespace) -> None:
    """Serve the emulator until Ctrl-C or SIGTERM."""
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
