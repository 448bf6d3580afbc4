"""Markdown tables and PNG plots of a scenario's JSON document (matplotlib only for the plots)."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

BLIND = ("least_connections", "round_robin", "random", "nginx")
SPREAD = ("spread_np4", "spread_np16")


def dumps(doc: Any, indent: int = 0) -> str:
    """JSON with objects indented one space a level and lists of scalars on one line."""
    pad = " " * indent
    if isinstance(doc, dict) and doc:
        items = [f"{pad} {json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in doc.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(doc, list) and any(isinstance(v, dict) for v in doc):
        items = [f"{pad} {dumps(v, indent + 1)}" for v in doc]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(doc, separators=(",", ":"))


def _num(value: Any, censored: bool = False, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f">={text}" if censored else text


def _drain(c: dict[str, Any]) -> str:
    if "drain_s" not in c:
        return "-"  # a document written before the drain rule
    return "never" if c["drain_s"] is None else f"{c['drain_s']:.0f}"


def table(doc: dict[str, Any]) -> str:
    """The scenario as a Markdown table, with the ratios the issue's targets are stated in."""
    gpus = next(
        (list(c["gpu_busy_s"]) for c in doc["contenders"].values() if c.get("gpu_busy_s")), []
    )
    rows = [
        f"### {doc['scenario']}: {doc.get('title', '')}",
        "",
        f"{doc.get('description', '')}; {doc['requests']} requests, emulator speed "
        f"x{doc['speed']:g}. Times in emulated seconds.",
        "",
        "| contender | TTFT p50 | TTFT p95 | TTFT p99 | e2e p50 | e2e p95 | output tok/s | failed "
        f"| unfinished | cold loads | evictions | GPU busy s ({' / '.join(gpus)}) | drain s "
        "| overloaded |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|",
    ]
    for name, c in doc["contenders"].items():
        cut = set(c.get("censored", ()))
        busy = " / ".join(f"{v:.0f}" for v in c.get("gpu_busy_s", {}).values()) or "-"
        loads = c.get("cold_loads", "-") if name != "lower_bound" else "-"
        evictions = c.get("evictions", "-") if name != "lower_bound" else "-"
        rows.append(
            f"| {name} | {_num(c.get('ttft_p50_s'), 'ttft_p50_s' in cut)} "
            f"| {_num(c.get('ttft_p95_s'), 'ttft_p95_s' in cut)} "
            f"| {_num(c.get('ttft_p99_s'), 'ttft_p99_s' in cut)} "
            f"| {_num(c.get('e2e_p50_s'), 'e2e_p50_s' in cut)} "
            f"| {_num(c.get('e2e_p95_s'), 'e2e_p95_s' in cut)} "
            f"| {_num(c.get('tokens_per_s'), digits=0)} | {c.get('failed', 0)} "
            f"| {c.get('unfinished', 0)} | {loads} | {evictions} | {busy} "
            f"| {_drain(c)} | {'**yes**' if c.get('overloaded') else 'no'} |"
        )
    rows += ["", *ratios(doc), ""]
    return "\n".join(rows)


def ratios(doc: dict[str, Any]) -> list[str]:
    """vram_queue's TTFT and e2e percentiles over the best contender that is not overloaded, its
    p95/p99 TTFT over the best blind one and its p95 TTFT over each spread server. A ratio against
    an overloaded contender is printed as ``overloaded``: its tail grows with the run's length,
    so no number against it is a stable factor, nor a target met."""
    cs = doc["contenders"]
    ours = cs.get("vram_queue")
    if not ours or ours.get("ttft_p95_s") is None:
        return []
    out = []
    peers = {n: c for n, c in cs.items() if n not in ("vram_queue", "lower_bound")}
    parts = []
    for key in TARGET_KEYS:
        name, text = best_ratio(ours, peers, key)
        parts.append(f"{_label(key)} {text}" + (f" ({name})" if name else ""))
    if parts:
        out.append("- vram_queue / best contender not overloaded: " + ", ".join(parts))
    blind = {n: cs[n] for n in BLIND if n in cs}
    for key in ("ttft_p95_s", "ttft_p99_s"):
        if blind:
            name, text = best_ratio(ours, blind, key)
            which = f"best blind ({name})" if name else "best blind"
            out.append(f"- vram_queue {_label(key)} / {which}: {text}")
    for name in SPREAD:
        if name in cs and cs[name].get("ttft_p95_s") is not None:
            out.append(
                f"- vram_queue TTFT p95 / {name}: {ratio_text(ours, cs[name], 'ttft_p95_s')}"
            )
    return out


TARGET_KEYS = ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p95_s")


def _label(key: str) -> str:
    return key.removesuffix("_s").replace("_", " ").replace("ttft", "TTFT")


def best_ratio(ours: dict[str, Any], peers: dict[str, dict[str, Any]], key: str) -> tuple[str, str]:
    """(name, ratio text) of ``ours`` over the peer with the lowest ``key`` among those not
    overloaded; ("", "overloaded (all N)") when every peer is overloaded."""
    fit = {n: c for n, c in peers.items() if not c.get("overloaded") and c.get(key) is not None}
    if not fit:
        return "", f"overloaded (all {len(peers)})" if peers else "-"
    name = min(fit, key=lambda n: fit[n][key])
    return name, ratio_text(ours, fit[name], key)


def ratio_text(ours: dict[str, Any], theirs: dict[str, Any], key: str) -> str:
    """``ours[key] / theirs[key]`` as ``0.52x``; ``overloaded`` when ``theirs`` is, with a
    note when ``ours`` is overloaded itself (then the ratio is a loss that grows with the run)."""
    if theirs.get("overloaded"):
        return "overloaded"
    a, b = ours.get(key), theirs.get(key)
    if a is None or not b:
        return "-"
    ratio = a / b
    text = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"
    if key in ours.get("censored", ()) or key in theirs.get("censored", ()):
        text = "~" + text  # a censored percentile is a lower bound: the ratio is approximate
    if ours.get("overloaded"):
        text += " (vram_queue overloaded)"
    return text


FAIRNESS_TARGET = 1.5
"""The issue's target: the other users' TTFT p95 with the flood within 1.5x of it without."""


def _others(c: dict[str, Any]) -> dict[str, Any]:
    """One contender's numbers over the ordinary users' requests (kind ``chat``; a run of them
    alone has no ``by_kind``)."""
    by_kind = c.get("by_kind")
    if by_kind:
        return dict(by_kind.get("chat", {}))
    return {**c, "n": c.get("requests")}


def fairness(flood: dict[str, Any], baseline: dict[str, Any]) -> str:
    """Per contender, the other users' TTFT p95 in the ``fairness`` run over the same users' in
    the ``fairness-baseline`` run (the same requests, no flooding user). The ratio is ``overloaded``
    where the baseline run itself was. Percentiles leave failed requests out: the ``failed``
    column says how many of the other users' requests were refused or broke."""
    rows = [
        "### fairness: the other users' TTFT p95 with the flood / without it",
        "",
        f"{flood.get('description', '')}; against `{baseline['scenario']}`, the same requests "
        f"without the flooding user. Target: vram_queue <= {FAIRNESS_TARGET:g}x. Times in "
        "emulated seconds.",
        "",
        "| contender | others' TTFT p95 without the flood | with the flood | with / without "
        "| flood's own TTFT p95 | others' requests (without / with) | others' failed "
        "(without / with) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    summary = []
    same = True
    for name, c in flood["contenders"].items():
        base = baseline["contenders"].get(name)
        if base is None:
            continue
        ours, theirs = _others(c), {**_others(base), "overloaded": base.get("overloaded")}
        text = ratio_text(ours, theirs, "ttft_p95_s")
        flooder = c.get("by_kind", {}).get("flood", {})
        same = same and ours.get("n") == theirs.get("n")
        rows.append(
            f"| {name} | {_p95(theirs)} | {_p95(ours)} | **{text}** | {_p95(flooder)} "
            f"| {theirs.get('n', '-')} / {ours.get('n', '-')} "
            f"| {theirs.get('failed', '-')} / {ours.get('failed', '-')} |"
        )
        if name == "vram_queue":
            a, b = ours.get("ttft_p95_s"), theirs.get("ttft_p95_s")
            met = a is not None and b and not theirs["overloaded"] and a / b <= FAIRNESS_TARGET
            text += f" (target <= {FAIRNESS_TARGET:g}x: {'met' if met else 'missed'})"
        if name != "lower_bound":
            summary.append(f"{name} {text}")
    rows += ["", "- others' TTFT p95 with the flood / without it: " + ", ".join(summary)]
    if not same or (flood.get("quick"), flood.get("seed")) != (
        baseline.get("quick"),
        baseline.get("seed"),
    ):
        rows.append(
            "- **the two documents come from runs of different sizes or seeds**: rerun both "
            "(`--scenario fairness --scenario fairness-baseline`) before reading the ratios"
        )
    return "\n".join([*rows, ""])


def _p95(part: dict[str, Any]) -> str:
    return _num(part.get("ttft_p95_s"), "ttft_p95_s" in part.get("censored", ()))


def fairness_from(out: Path) -> str | None:
    """:func:`fairness` of ``out/fairness.json`` and ``out/fairness-baseline.json``; None unless
    both are there."""
    paths = [out / "fairness.json", out / "fairness-baseline.json"]
    if not all(p.is_file() for p in paths):
        return None
    flood, baseline = (json.loads(p.read_text(encoding="utf-8")) for p in paths)
    return fairness(flood, baseline)


def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """``<scenario>_ttft_cdf.png``, ``<scenario>_bars.png`` and ``<scenario>_backlog.png``;
    nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
        return []
    name = doc["scenario"]
    cs = doc["contenders"]

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    for contender, c in cs.items():
        qs = c.get("ttft_quantiles_s") or []
        if qs:
            label = contender + (" (overloaded)" if c.get("overloaded") else "")
            bound = contender == "lower_bound"
            ax.plot(
                [max(q, 1e-3) for q in qs],
                [i / 100 for i in range(len(qs))],
                label=label,
                linewidth=1.6,
                color="black" if bound else None,
                linestyle="--" if bound else "-",
            )
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (emulated s, log)")
    ax.set_ylabel("share of streamed requests")
    ax.set_title(f"{name}: TTFT CDF ({doc['requests']} requests)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    cdf = out / f"{name}_ttft_cdf.png"
    _save(fig, cdf)
    plt.close(fig)

    names = list(cs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=80)
    x = range(len(names))
    for offset, key in ((-0.27, "ttft_p50_s"), (0.0, "ttft_p95_s"), (0.27, "ttft_p99_s")):
        values = [cs[n].get(key) or 0.0 for n in names]
        axes[0].bar([i + offset for i in x], values, width=0.27, label=key[5:8])
    axes[0].set_yscale("log")
    axes[0].set_title("TTFT p50 / p95 / p99 (emulated s, log)")
    axes[0].legend(fontsize=8)
    loads = [cs[n].get("cold_loads", 0) if n != "lower_bound" else 0 for n in names]
    evictions = [cs[n].get("evictions", 0) if n != "lower_bound" else 0 for n in names]
    axes[1].bar([i - 0.2 for i in x], loads, width=0.4, label="cold loads")
    axes[1].bar([i + 0.2 for i in x], evictions, width=0.4, label="evictions")
    axes[1].set_title("model loads and evictions")
    axes[1].legend(fontsize=8)
    gpus = sorted({g for n in names for g in cs[n].get("gpu_busy_s", {})})
    width = 0.8 / max(len(gpus), 1)
    for j, gpu in enumerate(gpus):
        values = [cs[n].get("gpu_busy_s", {}).get(gpu, 0.0) for n in names]
        axes[2].bar([i - 0.4 + (j + 0.5) * width for i in x], values, width=width, label=gpu)
    axes[2].set_title("busy time per GPU (emulated s)")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{name}: {doc.get('title', '')}")
    fig.tight_layout()
    bars = out / f"{name}_bars.png"
    _save(fig, bars)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    for contender, c in cs.items():
        series = c.get("backlog_series") or []
        if series:
            bound = contender == "lower_bound"
            ax.plot(
                [t for t, _ in series],
                [n for _, n in series],
                label=contender,
                linewidth=1.3,
                color="black" if bound else None,
                linestyle="--" if bound else "-",
            )
    ax.set_xlabel("emulated s since the start")
    ax.set_ylabel("requests in the system")
    ax.set_title(f"{name}: requests sent and not yet answered")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    backlog = out / f"{name}_backlog.png"
    _save(fig, backlog)
    plt.close(fig)
    return [cdf, bars, backlog]


def _save(fig: Any, path: Path) -> None:
    """A PNG with a 64-colour palette: a third of the size, the same picture for line plots."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    try:
        from PIL import Image
    except ImportError:
        path.write_bytes(buf.getvalue())
        return
    buf.seek(0)
    with Image.open(buf) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)
