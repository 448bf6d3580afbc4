"""Chaos benchmark: faults injected into an emulated box behind a real `ollamux serve`, one table.

    python -m benchmarks.chaos [--quick] [--only kill,hang-warm,...] [--src DIR] [--out DIR]

Every scenario starts a fresh ``ollamux serve`` (config/demo.yaml's four emulated GPUs with 4
slots each, free loopback ports, its own models_dir, emulator speed x3) with the shipped defaults
unless the row's label names a setting, and stops it, its instances and anything they left
(stopped ones resumed first). Times below are ``--quick`` (full run in brackets):

1. **kill**: 12 closed-loop users of llama3.1:8b (3 in 4 streamed, 4 in 5 /api/chat and the rest
   /api/generate, 150-250 tokens); after 3 s (6 s) the busiest instance gets SIGKILL; 6 s (20 s)
   more of load.
2. **hang warm**: the same, but the busiest instance (model loaded) gets ``{"hang": true}``: new
   requests there never answer; 15 s (25 s) of load after it. Goal: detected within 15 s.
3. **hang cold**: 8 users of llama3.1:8b leave two GPUs empty; the empty instance a cold load goes
   to first gets the hang, and 6 users of qwen2.5:7b (loaded nowhere) start. A cold first token
   may take ``timeouts.first_token`` plus ``timeouts.load`` (120 s shipped), so ``--quick`` sets
   ``timeouts.load: 10s`` (shown in the label); the load runs that sum plus 4 s after the fault.
4. **freeze**: SIGSTOP on the busiest instance with streams on it; its streams must end with an
   error line after ``timeouts.idle`` (30 s shipped; ``--quick`` sets 10 s); the load runs 20 s
   (34 s) after the fault, long enough for requests caught before the health checks notice to be
   retried; SIGCONT at the end.
5. **die mid-stream**: ``{"die_after_tokens": 100}`` on the busiest instance for the rest of the
   run (6 s, 20 s).
6. **cancel storm**: 1,000 requests, 64 at a time, each cancelled by its client 5-500 ms after it
   was sent (streamed or not, chat or generate, 200-600 tokens, four models); then what the proxy
   still counts after up to 4 s (10 s) of settling, and one non-streamed request per model, which
   must be answered within 8 s (60 s).
7. **sigterm**: 12 (16) streams of 1,500 (3,000) tokens; once all stream, SIGTERM to the serve
   process alone; a new request 0.3 s later. Goals: every stream ends ``done: true``; the new
   request is refused (port closed) or gets 503.
8. **100 MB body** to /api/chat (non-streamed, the text in one message); ``GET /`` every 25 ms
   meanwhile; the answer is awaited up to 40 s (120 s). Goal: RSS after within 10 % of before.
9. **overload**: 16 users measure what the box serves (300-token streams); then Poisson arrivals
   at 6 times that (40-200/s) for 5 s (30 s); admitted requests get 20 s more. Goals: no 5xx but
   503, 503s within 100 ms (p99), RSS within 10 %, every admitted request answered.

Columns. Each request is one of: **ok** (its answer ended ``done: true``); **refused** (503, 413
or 429, or connection refused: a deliberate no); **lost before first byte** (no byte of an
answer: a connection error, another status, or no byte by the harness's deadline); **cut** (the
answer ended early with an ``{"error": ...}`` line); **silent** (it ended early without one: the
connection closed, or it was still open at the deadline); the storm's cancelled requests count
in ``requests`` only. Requests still running 2 s (15 s) after a scenario's load stops are given
up: they count as lost or silent, and as ``hung`` in the JSON.

**detect** (instance faults only): seconds from the fault to the earlier of (a) the first status
sample (every 0.2 s) showing the instance ``down`` or ``ejected``, and (b) the first sample that
opens 3 s in which the proxy routes nothing new to it (the sum of its ``reasons`` in
``/proxy/status`` stays put), holds nothing in flight there, and routes requests elsewhere; an
instance kept full of stuck requests is not detected. **recover**: seconds from the fault to the
first moment T by which every disturbed request (not answered completely with a first byte
within 3 s) that was running at the fault or sent after it is over (at its first byte if it was
answered in the end, e.g. by a retry elsewhere; else when it ended or was given up), and from
which complete answers over [T, T+2 s] come at 80 % or more of their rate over the 2 s before
the fault. ``>N``: not within the N s of load after the fault. The JSON also has each instance
fault's timeline (state, in flight, routed) and how many requests went to the faulty instance
after the fault and after detection. **RSS**: of the serve process (the proxy; the instances
are other processes) before the fault or load, at the end, and the highest sample.
**in flight left**: what the proxy still counts (in flight by ``/proxy/status`` or by the
``ollamux_inflight`` gauge, whichever is higher, plus its queue) once the clients are done and
after up to 2 s of settling (storm: see above).

Results go to ``OUT/chaos.json`` (with every request lost, cut or silent); the table to stdout,
progress to stderr. ``--src DIR`` runs another tree's ``proxy`` package (e.g. ``git archive`` of
an older commit) for a before/after table; settings that tree does not know are dropped, with a
note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.chaos_faults import die, freeze, hang_cold, hang_warm, kill
from benchmarks.chaos_plan import FULL, QUICK, Ctx
from benchmarks.chaos_stress import big_body, overload, sigterm, storm
from benchmarks.procs import ROOT

RESULTS = Path(__file__).with_name("results")
SCENARIOS: dict[str, Callable[[Ctx], Awaitable[dict[str, Any]]]] = {
    "kill": kill,
    "hang-warm": hang_warm,
    "hang-cold": hang_cold,
    "freeze": freeze,
    "die": die,
    "storm": storm,
    "sigterm": sigterm,
    "body": big_body,
    "overload": overload,
}


def _seconds(row: dict[str, Any], key: str) -> str:
    if "window_s" not in row:
        return "-"
    value = row.get(key)
    return f">{row['window_s']:g}" if value is None else f"{value:.1f}"


def _rss(row: dict[str, Any]) -> str:
    def v(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.0f}"

    return f"{v('rss_before_mb')} → {v('rss_after_mb')} ({v('rss_peak_mb')})"


def _goals(row: dict[str, Any]) -> str:
    marks = {True: "✓", False: "✗", None: "?"}
    text = "; ".join(f"{g['goal']} {marks[g['met']]}" for g in row.get("goals", []))
    notes = "; ".join(row.get("notes", []))
    return f"{text} ({notes})" if notes else text


def table(doc: dict[str, Any]) -> str:
    """The rows as one Markdown table."""
    lines = [
        "| scenario | requests | ok | refused | lost before 1st byte | cut (error line) | silent "
        "| detect s | recover s | proxy RSS MB before → after (peak) | in flight left | goals |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|",
    ]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['scenario']} | failed to run: {r['error']} |||||||||||")
            continue
        left = "-" if r.get("inflight_left") is None else str(r["inflight_left"])
        lines.append(
            f"| {r['label']} | {r['requests']} | {r['ok']} | {r['refused']} | {r['lost']} "
            f"| {r['cut']} | {r['silent']} | {_seconds(r, 'detect_s')} "
            f"| {_seconds(r, 'recover_s')} | {_rss(r)} | {left} | {_goals(r)} |"
        )
    return "\n".join(lines)


def _commit(src: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def run(names: Sequence[str], ctx: Ctx) -> dict[str, Any]:
    """Run the scenarios one after the other; SIGTERM, like Ctrl-C, stops the run after the
    running scenario cleaned up (its processes resumed and stopped)."""
    main_task = asyncio.current_task()
    if main_task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for name in names:
        print(f"{name}:", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            row = await SCENARIOS[name](ctx)
        except Exception as exc:  # one broken scenario must not hide the others
            row = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"  {row['seconds']} s: " + (row.get("error") or _goals(row)), file=sys.stderr)
    return {
        "benchmark": "chaos",
        "quick": ctx.sizes.quick,
        "src": str(ctx.src),
        "commit": _commit(ctx.src),
        "speed": ctx.sizes.speed,
        "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short windows: under 3 minutes")
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--src", type=Path, default=ROOT, help="the source tree to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="ollamux-chaos-") as tmp:
        ctx = Ctx(workdir=Path(tmp), sizes=QUICK if args.quick else FULL,
                  src=args.src.resolve(), rng=random.Random(args.seed))  # fmt: skip
        try:
            doc = asyncio.run(run(names, ctx))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted: every process stopped, nothing written", file=sys.stderr)
            return 130
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(report.dumps(doc) + "\n", encoding="utf-8")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
