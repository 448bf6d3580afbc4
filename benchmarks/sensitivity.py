"""Does the spread-vs-ollamux conclusion hold if the emulator's model of a split is wrong?

    python -m benchmarks.routing --sensitivity [--grid] [--quick] [--scenario NAME]

The spread servers' speed in the emulator rests on three numbers nobody measured on this box
(benchmarks/emulator_knobs.py): the split penalty per extra GPU (6 %), the prefill gain of a split
over four GPUs (x1.45) and the batching cap (x3.7). For each scenario (multi-model and open-webui
by default) this runs ``vram_queue`` once and ``spread_np4`` and ``spread_np16`` under each setting:
one at a time around the defaults (penalty 0 / 6 / 15 %, gain x1.0 / x1.2 / x1.45, cap x3.7 / x6),
or every combination with ``--grid`` (18 settings). ``vram_queue`` runs once because none of the
three numbers changes a one-GPU server with at most 4 sequences. Each row says whether
``vram_queue``'s TTFT p95 is lower ("better"), within 5 % ("even") or higher ("worse") than the
spread server's, and the settings where that conclusion differs from the defaults' are listed as
flips. A ratio against an overloaded spread server is printed as "overloaded" (report.ratio_text).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.contenders import Box
from benchmarks.emulator_knobs import DEFAULT, Knobs
from benchmarks.report import ratio_text
from benchmarks.workload import Scenario

SCENARIOS = ("multi-model", "open-webui")
SPREAD = ("spread_np4", "spread_np16")
PENALTIES = (0.0, 0.06, 0.15)
GAINS = (1.0, 1.2, 1.45)
CAPS = (3.7, 6.0)
EVEN = 0.05
"""Ratios within 5 % of 1 are ``even``: the benchmark issue's tolerance, and run-to-run noise."""
KEPT = (
    "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p95_s", "tokens_per_s", "failed", "unfinished",
    "drain_s", "overloaded", "censored", "cold_loads", "wall_s",
)  # fmt: skip

RunOne = Callable[[Scenario, str, Box], Awaitable[dict[str, Any]]]
"""Runs one contender on a scenario and box and returns its summary (routing.run_contender)."""


def settings(grid: bool) -> list[Knobs]:
    """The defaults first, then each number varied alone, or every combination with ``grid``."""
    if grid:
        every = [Knobs(p, g, c) for p, g, c in itertools.product(PENALTIES, GAINS, CAPS)]
        return [DEFAULT, *(k for k in every if k != DEFAULT)]
    out = [DEFAULT]
    out += [dataclasses.replace(DEFAULT, split_penalty=p) for p in PENALTIES]
    out += [dataclasses.replace(DEFAULT, prefill_gain=g) for g in GAINS]
    out += [dataclasses.replace(DEFAULT, batch_cap=c) for c in CAPS]
    return list(dict.fromkeys(out))


def _kept(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in KEPT if k in summary}


async def run(
    scenario: Scenario, box: Box, run_one: RunOne, *, grid: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """The sensitivity document of one scenario."""
    ours = await run_one(scenario, "vram_queue", box)
    log(f"{scenario.name}: vram_queue TTFT p95 {ours.get('ttft_p95_s')} s")
    rows = []
    for knobs in settings(grid):
        row: dict[str, Any] = {"knobs": dataclasses.asdict(knobs)}
        knobbed = dataclasses.replace(box, spread_knobs=knobs.flags())
        for name in SPREAD:
            row[name] = _kept(await run_one(scenario, name, knobbed))
            log(f"{scenario.name}: {name} ({knobs.label()}) TTFT p95 {row[name].get('ttft_p95_s')}")
        rows.append(row)
    return {
        "sensitivity": scenario.name,
        "title": scenario.title,
        "requests": len(scenario.requests),
        "speed": scenario.speed,
        "grid": grid,
        "vram_queue": _kept(ours),
        "rows": rows,
    }


def verdict(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """``better``, ``even`` (within 5 %) or ``worse``: vram_queue's TTFT p95 against ``theirs`` (an
    overloaded spread server is beaten whatever its number, an overloaded vram_queue loses to one
    that is not)."""
    if ours.get("overloaded") != theirs.get("overloaded"):
        return "worse" if ours.get("overloaded") else "better"
    ratio = ours["ttft_p95_s"] / theirs["ttft_p95_s"] if theirs["ttft_p95_s"] else 1.0
    if abs(ratio - 1) <= EVEN:
        return "even"
    return "better" if ratio < 1 else "worse"


def flips(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Per spread server, the settings whose verdict differs from the defaults' (first row)."""
    ours, rows = doc["vram_queue"], doc["rows"]
    out: dict[str, list[str]] = {}
    for name in SPREAD:
        base = verdict(ours, rows[0][name])
        out[name] = [
            Knobs(**r["knobs"]).label() for r in rows[1:] if verdict(ours, r[name]) != base
        ]
    return out


def _p95(c: dict[str, Any]) -> str:
    value = c.get("ttft_p95_s")
    text = "-" if value is None else f"{value:.2f}"
    if "ttft_p95_s" in c.get("censored", ()):
        text = ">=" + text
    return text + (" (overloaded)" if c.get("overloaded") else "")


def table(doc: dict[str, Any]) -> str:
    """The document as Markdown: one row per setting, then where the conclusion flips."""
    ours = doc["vram_queue"]
    lines = [
        f"### sensitivity: {doc['sensitivity']}: {doc.get('title', '')}",
        "",
        f"{doc['requests']} requests, emulator speed x{doc['speed']:g}, "
        f"{'every combination' if doc.get('grid') else 'one number at a time around the defaults'}"
        f". vram_queue (run once): TTFT p95 {_p95(ours)} s. Times in emulated seconds.",
        "",
        "| split penalty | prefill gain | batch cap | spread_np4 TTFT p95 | vram_queue / np4 "
        "| verdict | spread_np16 TTFT p95 | vram_queue / np16 | verdict |",
        "|--:|--:|--:|--:|--:|---|--:|--:|---|",
    ]
    for r in doc["rows"]:
        k = r["knobs"]
        cells = [f"{k['split_penalty']:.0%}", f"x{k['prefill_gain']:g}", f"x{k['batch_cap']:g}"]
        for name in SPREAD:
            c = r[name]
            cells += [_p95(c), ratio_text(ours, c, "ttft_p95_s"), verdict(ours, c)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    base = doc["rows"][0]
    for name, where in flips(doc).items():
        at_default = verdict(ours, base[name])
        if where:
            lines.append(
                f"- {name}: vram_queue is {at_default} at p95 TTFT with the defaults; the "
                f"conclusion flips with {'; '.join(where)}"
            )
        else:
            lines.append(f"- {name}: vram_queue is {at_default} at p95 TTFT under every setting")
    lines.append("")
    return "\n".join(lines)


def names(requested: Sequence[str] | None) -> list[str]:
    return list(requested) if requested else list(SCENARIOS)


def path(out: Path, scenario: Scenario) -> Path:
    return out / f"sensitivity_{scenario.name}.json"
