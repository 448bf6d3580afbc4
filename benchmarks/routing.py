"""Routing benchmark: the same seeded workloads replayed against every contender, side by side.

    python -m benchmarks.routing [--quick] [--scenario NAME] [--contenders A,B] [--out DIR]
                                 [--api native|openai]
    python -m benchmarks.routing --sensitivity [--grid] [--quick]   (benchmarks/sensitivity.py)

Each contender is started fresh (nothing loaded) on free 127.0.0.1 ports in front of the emulated
demo box (config/demo.yaml: 2 x 24 GiB at speed 1.0, 2 x 48 GiB at speed 0.85, NUM_PARALLEL 4,
context 8192), the scenario is replayed against it, and it is stopped. Writes
``DIR/<scenario>.json`` and PNG plots (when matplotlib is installed); prints a table per scenario.
All times are emulated (virtual) seconds: wall time measured by the client times the emulator's
speed. ``--api openai`` sends every chat to ``/v1/chat/completions`` instead of ``/api/chat``
(LiteLLM's contenders get /v1 whatever it says; each summary names its ``endpoint``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import confined, peer_env, report, sensitivity
from benchmarks.contenders import (
    BOX_CONTENDERS,
    CONTENDERS,
    LOWER_BOUND,
    TWO_BOX_CONTENDERS,
    VARIANTS,
    Box,
    describe,
    nginx_binary,
    start,
)
from benchmarks.openai_wire import APIS, NATIVE, PATHS
from benchmarks.procs import ROOT, cpu_seconds, self_cpu_seconds
from benchmarks.replay import Progress, replay, write_requests
from benchmarks.stats import bound_backlog, lower_bound, summarize
from benchmarks.workload import (
    FAIRNESS,
    FAIRNESS_BASELINE,
    SCENARIOS,
    TRACE_SLICE,
    Scenario,
    Size,
)

RESULTS = Path(__file__).with_name("results")
QUICK_SCENARIOS = ("trace", "multi-model")
DRAIN_S = 120.0
"""Emulated seconds a contender gets, after the ideal end of the workload, to finish it."""


async def run_contender(
    scenario: Scenario,
    name: str,
    box: Box,
    *,
    workdir: Path,
    seed: int,
    quiet: bool = False,
    requests_csv: Path | None = None,
    api: str = NATIVE,
) -> dict[str, Any]:
    """Start ``name``, replay ``scenario`` against it on ``api``, stop it; its summary (and,
    with ``requests_csv``, one CSV line per request there)."""
    ideal = lower_bound(scenario, box)["makespan_s"]
    deadline = ideal + max(DRAIN_S, 0.5 * ideal)
    wall0 = time.monotonic()
    async with start(
        name, box, speed=scenario.speed, workdir=workdir / name, seed=seed, timeout=deadline * 2,
        api=api,
    ) as running:  # fmt: skip
        started_s = time.monotonic() - wall0
        pids = {"front": running.front, "backends": running.backend_pids}
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        client0, t0 = self_cpu_seconds(), time.monotonic()
        progress = Progress(f"{scenario.name}: {name}", len(scenario.requests), enabled=not quiet)
        results, watch = await replay(scenario, running, deadline=deadline, progress=progress)
        wall = time.monotonic() - t0
        cpu = {k: sum(cpu_seconds(p) for p in v) - cpu0[k] for k, v in pids.items()}
        cpu["client"] = self_cpu_seconds() - client0
        proxy = await proxy_metrics(running.metrics_url) if running.metrics_url else {}
        endpoint, notes = PATHS[running.api], running.notes
    if requests_csv is not None:
        write_requests(results, requests_csv)
    cores = os.cpu_count() or 1
    extra: dict[str, Any] = {
        "wall_s": round(wall, 2),
        "startup_wall_s": round(started_s, 2),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_busy_share": round(sum(cpu.values()) / (wall * cores), 3) if wall else None,
        "sampler_polls_failed": watch.failed_polls,
        "endpoint": endpoint,
    }
    if notes:
        extra["notes"] = notes
    if proxy:
        extra["proxy"] = proxy
    return summarize(
        scenario,
        results,
        watch,
        end=deadline,
        extra=extra,
        bound=bound_backlog(scenario, box),
    )


async def proxy_metrics(url: str) -> dict[str, Any]:
    """What ollamux itself counted: loads, routing decisions by reason, refusals, retries."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return {}
    out: dict[str, Any] = {"model_loads": 0, "decisions": {}, "rejected": {}, "retries": 0}
    out["eval_tokens"] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ollamux_model_loads_total":
                out["model_loads"] += int(s.value)
            elif s.name == "ollamux_routing_decisions_total":
                out["decisions"][s.labels["reason"]] = int(s.value)
            elif s.name == "ollamux_rejected_total":
                if s.value:  # every reason has a series from the start, at 0
                    out["rejected"][s.labels["reason"]] = int(s.value)
            elif s.name == "ollamux_retries_total":
                out["retries"] = int(s.value)
            elif s.name == "ollamux_tokens_total" and s.labels.get("kind") == "eval":
                inst = s.labels["backend"]
                out["eval_tokens"][inst] = out["eval_tokens"].get(inst, 0) + int(s.value)
    return out


def code_version() -> dict[str, Any]:
    """The commit the proxy and emulator ran from, and whether proxy/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return {}
    return {"commit": commit, "proxy_modified": bool(dirty)}


async def run_scenario(
    scenario: Scenario,
    contenders: Sequence[str],
    *,
    box: Box,
    workdir: Path,
    seed: int = 0,
    quiet: bool = False,
    requests_dir: Path | None = None,
    api: str = NATIVE,
) -> dict[str, Any]:
    """Every contender on ``scenario`` (on ``api``); the JSON document of the scenario."""
    doc: dict[str, Any] = {
        "scenario": scenario.name,
        "title": scenario.title,
        "description": scenario.description,
        "speed": scenario.speed,
        "time_unit": "emulated seconds (measured wall time x speed)",
        "requests": len(scenario.requests),
        "models": scenario.models,
        "box": describe(box),
        "seed": seed,
        "code": code_version(),
        "contenders": {},
    }
    for name in contenders:
        if name == LOWER_BOUND:
            doc["contenders"][name] = lower_bound(scenario, box)
            continue
        csv_path = requests_dir / f"{scenario.name}.{name}.csv" if requests_dir else None
        if name in peer_env.PEERS:
            summary = await confined.run_peer(
                scenario, name, box, run=run_contender, workdir=workdir, seed=seed, quiet=quiet,
                requests_csv=csv_path, api=api,
            )  # fmt: skip
            if summary is not None:
                doc["contenders"][name] = summary
            continue
        doc["contenders"][name] = await run_contender(
            scenario, name, box, workdir=workdir, seed=seed, quiet=quiet, requests_csv=csv_path,
            api=api,
        )  # fmt: skip
    return doc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.routing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short workloads, two scenarios")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all"
    )
    parser.add_argument(
        "--contenders",
        help="comma-separated subset of "
        f"{','.join((*CONTENDERS, *BOX_CONTENDERS, *TWO_BOX_CONTENDERS, LOWER_BOUND))} "
        "(default: the scenario's own list, else all but the box contenders)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    parser.add_argument(
        "--api",
        choices=APIS,
        default=NATIVE,
        help="native: /api/chat (default); openai: /v1/chat/completions for every contender "
        "(LiteLLM gets /v1 either way)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", type=float, help="override each scenario's time compression")
    parser.add_argument("--trace", type=Path, default=TRACE_SLICE, help="trace CSV to replay")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--requests",
        action="store_true",
        help="also write DIR/<scenario>.<contender>.csv per request",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: print the tables and redraw the plots of DIR/*.json",
    )
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="vram_queue against the spread servers under other split penalties, prefill gains "
        "and batching caps (default scenarios: multi-model, open-webui)",
    )
    parser.add_argument(
        "--grid", action="store_true", help="with --sensitivity: every combination (18 settings)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if args.report:
        order = {name: i for i, name in enumerate(SCENARIOS)}
        paths = sorted(out.glob("*.json"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
        for path in paths:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if "sensitivity" in doc:
                print(sensitivity.table(doc))
                continue
            if "contenders" not in doc:
                continue  # not a routing document (e.g. overhead_*.json)
            print(report.table(doc))
            if not args.no_plots:
                report.plots(doc, out)
        print(report.fairness_from(out) or "", end="")
        return 0
    if args.sensitivity:
        return run_sensitivity(args)
    names = args.scenario or (list(QUICK_SCENARIOS) if args.quick else list(SCENARIOS))
    contenders = (
        [c.strip() for c in args.contenders.split(",") if c.strip()]
        if args.contenders
        else [*CONTENDERS, LOWER_BOUND]
    )
    known = {*CONTENDERS, *BOX_CONTENDERS, *TWO_BOX_CONTENDERS, *VARIANTS, LOWER_BOUND}
    unknown = set(contenders) - known
    if unknown:
        print(f"unknown contender(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if "nginx" in contenders and nginx_binary() is None:
        print("nginx is not installed: skipping it (apt-get install nginx)", file=sys.stderr)
        contenders.remove("nginx")
    contenders = peer_env.prepare(contenders)
    size = Size(quick=args.quick, seed=args.seed, trace=args.trace)
    box = Box.from_config()
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ollamux-bench-") as tmp:
        for name in names:
            scenario = SCENARIOS[name](size)
            if args.speed:
                scenario = Scenario(**{**scenario.__dict__, "speed": args.speed})
            print(f"{scenario.name}: {scenario.description}", file=sys.stderr)
            own = list(scenario.contenders) if scenario.contenders and not args.contenders else []
            if "nginx_8" in own and nginx_binary() is None:
                print("nginx is not installed: skipping nginx_8", file=sys.stderr)
                own.remove("nginx_8")
            doc = asyncio.run(
                run_scenario(
                    scenario,
                    own or contenders,
                    box=box.for_scenario(scenario),
                    workdir=Path(tmp),
                    seed=args.seed,
                    requests_dir=out if args.requests else None,
                    api=args.api,
                )
            )
            doc["quick"] = args.quick
            path = out / f"{scenario.name}.json"
            path.write_text(report.dumps(doc) + "\n", encoding="utf-8")
            print(report.table(doc))
            if not args.no_plots:
                for png in report.plots(doc, out):
                    print(f"wrote {png}", file=sys.stderr)
    if {FAIRNESS, FAIRNESS_BASELINE} & set(names):
        print(report.fairness_from(out) or "", end="")
    print(f"done in {time.monotonic() - began:.0f} s; results in {out}", file=sys.stderr)
    return 0


def run_sensitivity(args: argparse.Namespace) -> int:
    """``--sensitivity``: one document and table per scenario (benchmarks/sensitivity.py)."""
    size = Size(quick=args.quick, seed=args.seed, trace=args.trace)
    box = Box.from_config()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ollamux-sens-") as tmp:

        async def one(scenario: Scenario, name: str, knobbed: Box) -> dict[str, Any]:
            return await run_contender(
                scenario, name, knobbed, workdir=Path(tmp), seed=args.seed, quiet=True
            )

        for name in sensitivity.names(args.scenario):
            scenario = SCENARIOS[name](size)
            if args.speed:
                scenario = Scenario(**{**scenario.__dict__, "speed": args.speed})
            doc = asyncio.run(
                sensitivity.run(
                    scenario, box, one, grid=args.grid, log=lambda m: print(m, file=sys.stderr)
                )
            )
            doc |= {"quick": args.quick, "seed": args.seed, "code": code_version()}
            sensitivity.path(out, scenario).write_text(report.dumps(doc) + "\n", encoding="utf-8")
            print(sensitivity.table(doc))
    print(f"done in {time.monotonic() - began:.0f} s; results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
