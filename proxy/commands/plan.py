"""`ollamux plan`: propose the instance layout for this box (or one described) and its models.

The GPUs come from NVML, or from ``--gpu NAME:GIB`` (repeated) for a box described on the command
line; the models from ``--model`` (a name of the emulator's catalogue, or ``NAME:GIB``). The
reasoning (proxy/planner.py) is printed as ``#`` comment lines above a YAML config, so the whole
output can be saved as a config file and read by ``ollamux config check``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from proxy.cli_help import Subparsers
from proxy.errors import ConfigError
from proxy.planner import GIB, Card, Model, Plan

__all__ = ["KV_KIB_PER_GIB", "NAME", "parse_model", "register", "render", "run", "run_plan"]

NAME = "plan"
KV_KIB_PER_GIB = 8
"""KV cache per token of a model outside the catalogue: 8 KiB per GiB of weights (a 70B model at
Q4 gets ~320 KiB, as the catalogue's llama3.3:70b), never under 128 KiB."""


def register(commands: Subparsers) -> None:
    """``plan [--gpu NAME:GIB]... --model NAME[:GIB]... [--context N] [--users N]``."""
    plan = commands.add_parser(
        NAME,
        help="propose the instances (GPU groups, num_parallel) for this box and its models",
        description="Propose which GPUs form a group (one Ollama over several GPUs, for a model "
        "that fits no single card) and which stay single, and num_parallel for each, from the "
        "GPUs' memory and the models' weights and KV cache. Prints the reasoning as comments "
        "and a config that `ollamux config check` accepts.",
    )
    plan.add_argument(
        "--gpu",
        dest="gpus",
        action="append",
        default=[],
        metavar="NAME:GIB",
        help="a GPU of the box to plan for, e.g. rtx4090:24; repeat per GPU (default: this "
        "host's GPUs, read with NVML)",
    )
    plan.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME[:GIB]",
        help="a model users run, e.g. llama3.3:70b (sizes of known models are built in) or "
        "my-model:40 (40 GiB of weights); repeat per model",
    )
    plan.add_argument(
        "--context", type=int, default=8192, metavar="N", help="tokens per chat (default: 8192)"
    )
    plan.add_argument(
        "--users",
        type=int,
        default=4,
        metavar="N",
        help="chats expected at the same time, over all models (default: 4)",
    )
    plan.add_argument(
        "--emulated",
        action="store_true",
        help="a config of emulated instances (with the emulator's GPUs) to try the plan without "
        "GPUs: ollamux serve --config FILE",
    )


def run(args: argparse.Namespace) -> None:
    run_plan(
        args.gpus,
        args.models,
        context=args.context,
        users=args.users,
        emulated=args.emulated,
    )


def run_plan(
    gpus: list[str],
    models: list[str],
    *,
    context: int = 8192,
    users: int = 4,
    emulated: bool = False,
    out: TextIO | None = None,
) -> None:
    """Print the plan; ConfigError (exit 2) for bad flags or a model that fits nowhere,
    GpuUnavailable (exit 1) when no ``--gpu`` is given and NVML reads none."""
    from proxy.planner import plan

    if not models:
        raise ConfigError(
            "give the models users run, e.g. --model llama3.3:70b --model qwen2.5:32b",
            path="--model",
        )
    cards = [_card(i, text) for i, text in enumerate(gpus)] if gpus else _nvml_cards()
    parsed = [parse_model(text) for text in models]
    result = plan(cards, parsed, context=context, users=users)
    (out or sys.stdout).write(render(result, emulated=emulated))


def render(result: Plan, *, emulated: bool = False) -> str:
    """The reasoning as ``#`` lines, then the config as YAML."""
    import textwrap

    import yaml

    from proxy.planner import config_dict

    lines = ["# ollamux plan: the instances proposed for this box and its models", "#"]
    for line in result.lines:
        lines.extend(f"# {part}" for part in textwrap.wrap(line, 96, subsequent_indent="  "))
    lines.append("#")
    body = yaml.safe_dump(config_dict(result, emulated=emulated), sort_keys=False)
    return "\n".join(lines) + "\n" + body


def parse_model(text: str) -> Model:
    """``NAME`` of the catalogue, or ``NAME:GIB`` (weights in GiB; a known name keeps its KV)."""
    from proxy.emulator.catalogue import Catalogue

    catalogue = Catalogue()
    name, _, tail = text.rpartition(":")
    try:
        gib = float(tail) if name else None
    except ValueError:
        gib = None
    if gib is None:
        name = text
    spec = catalogue.find(name) if name else None
    if gib is not None and gib <= 0:
        raise ConfigError(f"{text!r}: GIB must be > 0, e.g. {name}:40", path="--model")
    if spec is None and gib is None:
        known = ", ".join(m.name for m in catalogue if not m.embedding)
        raise ConfigError(
            f"{text!r}: no built-in size for this model; give its weights in GiB as NAME:GIB "
            f"(e.g. {text}:40, `ollama list` shows the size) or use one of: {known}",
            path="--model",
        )
    weights = int(gib * GIB) if gib is not None else spec.size_bytes if spec else 0
    estimate = max(KV_KIB_PER_GIB * weights / GIB, 128)
    kv_kib = spec.kv_kib_per_token if spec is not None else estimate
    return Model(name=spec.name if spec else name, weights=weights, kv_per_token=int(kv_kib * 1024))


def _card(index: int, text: str) -> Card:
    from proxy.emulator.launch import parse_gpu

    spec = parse_gpu(text)
    return Card(index=index, name=spec.name, memory=spec.memory_bytes)


def _nvml_cards() -> list[Card]:
    from proxy.gpu.nvml import discover

    return [
        Card(index=g.reading.index, name=g.reading.name, memory=g.reading.memory_total,
             uuid=g.reading.uuid)
        for g in discover(processes=False)
    ]  # fmt: skip
