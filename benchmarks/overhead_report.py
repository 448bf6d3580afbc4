"""The overhead benchmark's numbers: one row per measured window, their spread, the table."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.overhead_load import Level
from benchmarks.stats import percentile


def row(path: str, streams: int, level: Level, direct: Level | None) -> dict[str, Any]:
    """One measured window of one path at one level (one repeat)."""
    p50 = percentile(level.ttft, 50) * 1000 if level.ttft else None
    p99 = percentile(level.ttft, 99) * 1000 if level.ttft else None
    out: dict[str, Any] = {
        "path": path,
        "streams": streams,
        "requests": level.requests,
        "errors": level.errors,
        "ttft_p50_ms": _r(p50),
        "ttft_p99_ms": _r(p99),
        "chunks_per_s": round(level.chunks / level.seconds) if level.seconds else 0,
    }
    if direct is not None and direct.ttft and p50 is not None and p99 is not None:
        out["added_ttft_p50_ms"] = _r(p50 - percentile(direct.ttft, 50) * 1000)
        out["added_ttft_p99_ms"] = _r(p99 - percentile(direct.ttft, 99) * 1000)
    if level.front_cpu_s is not None and level.chunks:
        out["front_cpu_ms_per_1000_chunks"] = _r(level.front_cpu_s / level.chunks * 1e6)
        out["front_cpu_share"] = round(level.front_cpu_s / level.seconds, 3)
        if level.front_cpu_s > 0:
            out["chunks_per_cpu_s"] = round(level.chunks / level.front_cpu_s)
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


SPREAD_KEYS = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "added_ttft_p50_ms",
    "added_ttft_p99_ms",
    "chunks_per_s",
    "front_cpu_ms_per_1000_chunks",
    "front_cpu_share",
    "chunks_per_cpu_s",
    "cpu_vs_nginx",
    "errors",
)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (phase, path, streams): [min, median, max] of every number over the repeats; CPU per
    chunk against nginx's is taken repeat by repeat (the same window of noise)."""
    nginx = {
        (r["phase"], r["streams"], r["repeat"]): r.get("front_cpu_ms_per_1000_chunks")
        for r in rows
        if r["path"] == "nginx"
    }
    for r in rows:
        theirs = nginx.get((r["phase"], r["streams"], r["repeat"]))
        ours = r.get("front_cpu_ms_per_1000_chunks")
        if r["path"] != "nginx" and theirs and ours is not None:
            r["cpu_vs_nginx"] = round(ours / theirs, 2)
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["phase"], r["path"], r["streams"]), []).append(r)
    out = []
    for (phase, path, streams), group in groups.items():
        entry: dict[str, Any] = {
            "phase": phase,
            "path": path,
            "streams": streams,
            "repeats": len(group),
        }
        for key in SPREAD_KEYS:
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                entry[key] = [min(values), _r(statistics.median(values)), max(values)]
        out.append(entry)
    return out


def _cell(entry: dict[str, Any], key: str) -> str:
    values = entry.get(key)
    if not values:
        return "-"
    lo, mid, hi = values
    return f"{mid:g}" if lo == hi else f"{mid:g} ({lo:g}-{hi:g})"


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"Backend: {doc['backend']}; {doc['tokens_per_request']} tokens per request; "
        f"{doc['seconds_per_level']:g} s measured per row; median (min-max) of "
        f"{doc['repeats']} repeats.",
        "",
        "| phase | path | streams | TTFT p50 ms | TTFT p99 ms | added p50 ms | added p99 ms "
        "| chunks/s | front CPU ms / 1000 chunks | front core busy | chunks per front CPU s "
        "| CPU x nginx "
        "| errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for e in doc["summary"]:
        cells = [_cell(e, k) for k in SPREAD_KEYS if k != "errors"]
        lines.append(
            f"| {e['phase']} | {e['path']} | {e['streams']} | "
            + " | ".join(cells)
            + f" | {_cell(e, 'errors')} |"
        )
    return "\n".join(lines)
