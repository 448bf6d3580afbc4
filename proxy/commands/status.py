"""`ollamux status`: reads a proxy's /proxy/status and renders it as a table (or JSON, or live).

The table answers "which GPU served what, and why": one row per instance and GPU with a memory bar,
utilization, in-flight requests against slots, recent time to first token and loaded models; the
queues per model; and the last requests with the instance each went to and the policy's reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from proxy.cli_help import URL_HELP, Subparsers
from proxy.errors import OllamuxError
from proxy.proxy_client import call, normalize_url
from proxy.terminal import (
    BOLD,
    CLEAR,
    DIM,
    GREEN,
    RED,
    YELLOW,
    alternate_screen,
    ascii_blocks,
    can_draw,
    colour_wanted,
    columns,
    cut,
    is_tty,
    paint,
    plain,
    terminal_size,
    visible_len,
)

BAR = 20
NARROW_BAR = 8
"""Memory bar cells in the narrow layout (a terminal narrower than the full table)."""
LOADED_ROOM = 30
"""Columns the LOADED column keeps at least in the full layout before the narrow one is taken."""
GIB = 1024**3

NAME = "status"


def register(commands: Subparsers) -> None:
    """``status [--url URL] [--watch [--interval S]] [--json]``."""
    status = commands.add_parser(
        NAME, help="show a running proxy: GPUs, loaded models, queues, recent requests"
    )
    status.add_argument("--url", help=URL_HELP)
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="with --watch (default: 2)"
    )
    status.add_argument("--json", action="store_true", help="print /proxy/status as JSON")


def run(args: argparse.Namespace) -> None:
    """The proxy at ``--url`` (else ``$OLLAMUX_URL``, else ``$OLLAMA_HOST``), once or watched."""
    from proxy.ollama_host import url_from_env

    url = args.url or url_from_env(os.environ)
    run_status(url, watch=args.watch, as_json=args.json, interval=args.interval)


def fetch_status(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url``/proxy/status; OllamuxError (exit 1) when the proxy is not there."""
    base = normalize_url(url)
    data = call(base, "GET", "/proxy/status", timeout=timeout)
    if not isinstance(data, dict) or "instances" not in data:
        raise OllamuxError(f"{base}/proxy/status is not an ollamux status")
    return data


def run_status(
    url: str,
    *,
    watch: bool = False,
    as_json: bool = False,
    interval: float = 2.0,
    out: TextIO | None = None,
    rounds: int | None = None,
    tty: bool | None = None,
    size: Callable[[], tuple[int, int]] | None = None,
) -> None:
    """Print the status once, or every ``interval`` s until Ctrl-C (or ``rounds``).

    On a terminal (``tty``, asked of ``out`` when not given) the table fits the terminal's width
    (``size``: columns and rows), in colour unless ``NO_COLOR`` is set; ``watch`` then draws each
    frame in place on the alternate screen, cut to the terminal's height, and leaves it on exit.
    Piped, the text is plain and full width, and ``watch`` frames are apart by a blank line.
    """
    out = out or sys.stdout
    tty = is_tty(out) if tty is None else tty
    measure = size or terminal_size
    draw = can_draw(out)
    colour = colour_wanted(tty)

    def frame(data: dict[str, Any] | str, fit_height: bool) -> str:
        if as_json:
            return data if isinstance(data, str) else json.dumps(data, indent=2) + "\n"
        width, height = measure() if tty else (None, None)
        height = height if fit_height else None
        if isinstance(data, str):  # the proxy did not answer this round
            lines = [paint(line, RED, colour) for line in data.splitlines()]
            text = "\n".join(_fit(lines, width, height)) + "\n"
        else:
            text = render(data, url=url, width=width, height=height, colour=colour)
        return text if draw else ascii_blocks(text)

    if not watch:
        out.write(frame(fetch_status(url), fit_height=False))
        return
    screen = tty and not as_json
    with alternate_screen(out) if screen else contextlib.nullcontext():
        done = 0
        while rounds is None or done < rounds:
            data: dict[str, Any] | str
            try:
                data = fetch_status(url, timeout=max(interval, 1.0))
            except OllamuxError as exc:
                data = f"{exc}\n(retrying every {interval:g}s; Ctrl-C to stop)\n"
            text = frame(data, fit_height=screen)
            # in place on the screen (no last newline: a full frame must not scroll); piped, a log
            out.write(CLEAR + text.rstrip("\n") if screen else ("\n" if done else "") + text)
            out.flush()
            done += 1
            if rounds is None or done < rounds:
                time.sleep(interval)


def render(
    data: dict[str, Any],
    *,
    url: str = "",
    now: float | None = None,
    width: int | None = None,
    height: int | None = None,
    colour: bool = False,
) -> str:
    """The status as text: a header, the instances and their GPUs, queues, recent requests.

    With ``width`` a section wider than it takes its narrow layout (shorter bars, fewer columns;
    instance, state, GPU memory, busy slots and loaded models stay) and every row is cut to it.
    With ``height`` the least important rows go first: recent requests, then queues, then the
    instance rows past the screen's end. ``colour`` adds ANSI colours (for a terminal only).
    """
    now = time.time() if now is None else now

    def fits(lines: list[str]) -> bool:
        return width is None or all(visible_len(line) <= width for line in lines)

    header = _header(data, url)
    header = paint(header if fits([header]) else _short_header(data), BOLD, colour)
    instances = data.get("instances") or []
    table = _instances(instances, now, colour=colour)
    # the full table while the LOADED column, last, keeps some room; it is cut at the edge
    loaded_at = plain(table[0]).find("LOADED")
    if not fits(table) and (width is None or loaded_at + LOADED_ROOM > width):
        table = _instances(instances, now, narrow=True, colour=colour)
    queues = data.get("queues") or {}
    waiting = ", ".join(f"{m} {n}" for m, n in sorted(queues.items())) or "none waiting"
    recent: list[str] = []
    if data.get("recent"):
        recent = _recent(data["recent"], now, colour=colour)
        if not fits(recent):
            recent = _recent(data["recent"], now, narrow=True, colour=colour)
        recent.insert(0, "Recent requests (newest first):")
    lacking = _lacking(instances)
    lines = [header, "", *table, *lacking, "", f"Queues: {waiting}"]
    lines += ["", *recent] if recent else []
    essential = 2 + len(table) + len(lacking)
    return "\n".join(_fit(lines, width, height, essential=essential)) + "\n"


FIXES = {
    "gpu memory": "run `ollamux agent` there and set gpu_source, or set memory_gib",
    "num_parallel": "set num_parallel to its OLLAMA_NUM_PARALLEL",
}


def _lacking(instances: Sequence[dict[str, Any]]) -> list[str]:
    """One line per instance that does not give the router every signal, with the fix."""
    lines = []
    for inst in instances:
        lacks = [str(x) for x in inst.get("lacks") or []]
        fixes = [FIXES[x] for x in lacks if x in FIXES]
        if lacks:
            fix = f" ({'; '.join(fixes)})" if fixes else ""
            lines.append(f"{inst.get('name', '?')} lacks {', '.join(lacks)}{fix}")
    return lines


def _estimate(inst: dict[str, Any]) -> str:
    """The memory cell of an instance without GPU readings: its estimate, if it has one."""
    capacity = int(inst.get("memory_capacity") or 0)
    free = inst.get("free_estimate")
    if not capacity or free is None:
        return "(no GPU reading)"
    used = capacity - int(free)
    return f"~{used / GIB:.1f}/{capacity / GIB:.1f} GiB ({inst.get('memory_source', '')})"


def _fit(lines: list[str], width: int | None, height: int | None, essential: int = 0) -> list[str]:
    """``lines`` cut to ``width`` and ``height``; past the ``essential`` first ones whole sections
    (after a blank line) are dropped, or cut to their title, column header and a first row."""
    if height is not None and len(lines) > height:
        if essential >= height:  # even the instances overflow: say what is hidden
            keep = max(height - 1, 1)
            hidden = essential - keep
            lines = [*lines[:keep], f"... {hidden} more rows (enlarge the terminal)"]
        else:
            kept = lines[:essential]
            i = essential
            while i < len(lines):
                j = lines.index("", i + 1) if "" in lines[i + 1 :] else len(lines)
                section = lines[i:j]  # its blank line, then its rows
                room = height - len(kept)
                if len(section) <= room:
                    kept += section
                elif room >= min(4, len(section)):  # blank, title, column header, one row
                    kept += section[:room]
                    break
                else:
                    break
                i = j
            lines = kept
        lines = lines[:height]
    return lines if width is None else [cut(line, width) for line in lines]


def _header(data: dict[str, Any], url: str) -> str:
    limits = data.get("queue_limits") or {}
    parts = [
        f"ollamux {data.get('version', '?')}" + (f" at {normalize_url(url)}" if url else ""),
        f"policy {data.get('policy', '?')}",
        f"up {_age(float(data.get('uptime_s') or 0))}",
        f"queued {data.get('queued', 0)}"
        + (f" (max {limits['max_per_model']}/model)" if "max_per_model" in limits else ""),
    ]
    return " | ".join(parts)


def _short_header(data: dict[str, Any]) -> str:
    """The header for a narrow terminal: no address, no queue limit."""
    uptime = _age(float(data.get("uptime_s") or 0))
    return (
        f"ollamux {data.get('version', '?')} | {data.get('policy', '?')} | up {uptime} | "
        f"queued {data.get('queued', 0)}"
    )


def _state(inst: dict[str, Any], now: float, *, narrow: bool = False) -> str:
    """``up``, ``down``, ``draining``, or ``ejected`` with when its probe is due."""
    state = str(inst.get("state", ""))
    until = inst.get("ejected_until")
    if state != "ejected" or until is None:
        return state
    left = float(until) - now
    if narrow:
        return f"ejected {_age(left)}" if left >= 1 else "ejected"
    return f"ejected (probe in {_age(left)})" if left >= 1 else "ejected (probing)"


def _instances(
    instances: Sequence[dict[str, Any]], now: float, *, narrow: bool = False, colour: bool = False
) -> list[str]:
    """One row per instance and GPU; ``narrow`` keeps state, memory, busy slots and model names."""
    rows: list[list[str]] = []
    for inst in instances:
        ttft = inst.get("ttft") or {}
        models = inst.get("loaded") or []
        loaded = ", ".join(
            str(m["name"]) if narrow else f"{m['name']} ({_gib(m.get('size_vram', 0))})"
            for m in models
        )
        loading = ", ".join(f"{m} (loading)" for m in inst.get("loading") or [])
        busy = f"{inst.get('inflight_total', 0)}/{inst.get('slots', 0)}"
        everything = ", ".join(x for x in (loaded, loading) if x) or "-"
        first = [str(inst.get("name", "")), _state(inst, now, narrow=narrow)]
        last = (
            [busy, everything]
            if narrow
            else [
                busy,
                f"{_secs(ttft.get('p50'))}/{_secs(ttft.get('p95'))}",
                _reasons(inst.get("reasons") or {}),
                everything,
            ]
        )
        gpus = inst.get("gpus") or []
        if not gpus:
            rows.append([*first, "-", _estimate(inst), *([] if narrow else [""]), *last])
        for i, gpu in enumerate(gpus):
            cells = (first, last) if i == 0 else (["", ""], [""] * len(last))
            rows.append([*cells[0], *_gpu_cells(gpu, narrow=narrow), *cells[1]])
    header = ["INSTANCE", "STATE", "GPU", "MEMORY", "BUSY", "LOADED"]
    if not narrow:
        header[4:4] = ["UTIL"]
        header[6:6] = ["TTFT p50/p95", "WHY"]
    return columns(header, rows, styles={1: _state_style}, colour=colour)


def _recent(
    recent: Sequence[dict[str, Any]], now: float, *, narrow: bool = False, colour: bool = False
) -> list[str]:
    """The last requests, newest first; ``narrow`` drops wait and tokens, the endpoint goes last."""
    rows = []
    for r in recent:
        cells = {
            "AGE": _age(now - float(r.get("at", now))),
            "ENDPOINT": str(r.get("endpoint", "")),
            "MODEL": str(r.get("model", "")),
            "INSTANCE": str(r.get("instance", "")),
            "WHY": str(r.get("reason", "")),
            "STATUS": str(r.get("status", "")),
            "WAIT": _secs(r.get("queue_wait")),
            "TTFT": _secs(r.get("ttft")),
            "TOKENS": "-" if r.get("eval_tokens") is None else str(r["eval_tokens"]),
        }
        rows.append(cells)
    header = (
        ["AGE", "MODEL", "INSTANCE", "WHY", "STATUS", "TTFT", "ENDPOINT"]
        if narrow
        else ["AGE", "ENDPOINT", "MODEL", "INSTANCE", "WHY", "STATUS", "WAIT", "TTFT", "TOKENS"]
    )
    styles = {header.index("STATUS"): _status_style}
    return columns(header, [[r[h] for h in header] for r in rows], styles=styles, colour=colour)


def _state_style(state: str) -> str:
    if state == "up":
        return GREEN
    return RED if state == "down" else YELLOW if state else ""


def _status_style(status: str) -> str:
    if status.startswith("2"):
        return GREEN
    if status == "499":  # the client went away
        return DIM
    return YELLOW if status.startswith("4") else RED if status else ""


def _gpu_cells(gpu: dict[str, Any], *, narrow: bool = False) -> list[str]:
    total = int(gpu.get("memory_total") or 0)
    used = int(gpu.get("memory_used") or 0)
    share = used / total if total else 0.0
    if narrow:
        return [
            str(gpu.get("gpu", "?")),
            f"{bar(share, NARROW_BAR)} {used / GIB:4.1f}/{total / GIB:.0f}G",
        ]
    memory = f"{bar(share)} {used / GIB:5.1f}/{total / GIB:.1f} GiB {share:4.0%}"
    return [str(gpu.get("gpu", "?")), memory, f"{float(gpu.get('utilization') or 0):.0%}"]


def bar(share: float, width: int = BAR) -> str:
    """``[#####.....]`` in block characters: ``share`` (0..1) of ``width`` cells filled."""
    filled = round(min(max(share, 0.0), 1.0) * width)
    return "[" + "█" * filled + "░" * (width - filled) + "]"


def _reasons(reasons: dict[str, int]) -> str:
    ordered = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return " ".join(f"{reason}:{n}" for reason, n in ordered) or "-"


def _gib(size: Any) -> str:
    return f"{int(size or 0) / GIB:.1f} GiB"


def _secs(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}s"


def _age(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
