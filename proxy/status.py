"""`ollamux status`: reads a proxy's /proxy/status and renders it as a table (or JSON, or live).

The table answers "which GPU served what, and why": one row per instance and GPU with a memory bar,
utilization, in-flight requests against slots, recent time to first token and loaded models; the
queues per model; and the last requests with the instance each went to and the policy's reason.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from proxy.errors import OllamuxError
from proxy.proxy_client import call, normalize_url

BAR = 20
GIB = 1024**3
CLEAR = "\x1b[H\x1b[2J"
"""Cursor home and clear screen: each --watch frame replaces the last one."""


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
) -> None:
    """Print the status once, or every ``interval`` s in place until Ctrl-C (or ``rounds``)."""
    out = out or sys.stdout
    draw = _can_draw(out)

    def frame(data: dict[str, Any]) -> str:
        if as_json:
            return json.dumps(data, indent=2) + "\n"
        text = render(data, url=url)
        return text if draw else _ascii(text)

    if not watch:
        out.write(frame(fetch_status(url)))
        return
    done = 0
    while rounds is None or done < rounds:
        try:
            text = frame(fetch_status(url, timeout=max(interval, 1.0)))
        except OllamuxError as exc:
            text = f"{exc}\n(retrying every {interval:g}s; Ctrl-C to stop)\n"
        out.write(text if as_json else CLEAR + text)
        out.flush()
        done += 1
        if rounds is None or done < rounds:
            time.sleep(interval)


def render(data: dict[str, Any], *, url: str = "", now: float | None = None) -> str:
    """The status as text: a header, the instances and their GPUs, queues, recent requests."""
    now = time.time() if now is None else now
    lines = [_header(data, url), ""]
    lines += _instances(data.get("instances") or [], now)
    lines.append("")
    queues = data.get("queues") or {}
    waiting = ", ".join(f"{m} {n}" for m, n in sorted(queues.items())) or "none waiting"
    lines.append(f"Queues: {waiting}")
    recent = data.get("recent") or []
    if recent:
        lines += ["", "Recent requests (newest first):"]
        lines += _table(
            ["AGE", "ENDPOINT", "MODEL", "INSTANCE", "WHY", "STATUS", "WAIT", "TTFT", "TOKENS"],
            [
                [
                    _age(now - float(r.get("at", now))),
                    str(r.get("endpoint", "")),
                    str(r.get("model", "")),
                    str(r.get("instance", "")),
                    str(r.get("reason", "")),
                    str(r.get("status", "")),
                    _secs(r.get("queue_wait")),
                    _secs(r.get("ttft")),
                    "-" if r.get("eval_tokens") is None else str(r["eval_tokens"]),
                ]
                for r in recent
            ],
        )
    return "\n".join(lines) + "\n"


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


def _state(inst: dict[str, Any], now: float) -> str:
    """``up``, ``down``, ``draining``, or ``ejected`` with when its probe is due."""
    state = str(inst.get("state", ""))
    until = inst.get("ejected_until")
    if state != "ejected" or until is None:
        return state
    left = float(until) - now
    return f"ejected (probe in {_age(left)})" if left >= 1 else "ejected (probing)"


def _instances(instances: Sequence[dict[str, Any]], now: float) -> list[str]:
    rows: list[list[str]] = []
    for inst in instances:
        ttft = inst.get("ttft") or {}
        loaded = ", ".join(
            f"{m['name']} ({_gib(m.get('size_vram', 0))})" for m in inst.get("loaded") or []
        )
        loading = ", ".join(f"{m} (loading)" for m in inst.get("loading") or [])
        first = [
            str(inst.get("name", "")),
            _state(inst, now),
            f"{inst.get('inflight_total', 0)}/{inst.get('slots', 0)}",
            f"{_secs(ttft.get('p50'))}/{_secs(ttft.get('p95'))}",
            _reasons(inst.get("reasons") or {}),
            ", ".join(x for x in (loaded, loading) if x) or "-",
        ]
        gpus = inst.get("gpus") or []
        if not gpus:
            rows.append([*first[:2], "-", "(no GPU reading)", "", *first[2:]])
        for i, gpu in enumerate(gpus):
            cells = first if i == 0 else ["", "", "", "", "", ""]
            rows.append([*cells[:2], *_gpu_cells(gpu), *cells[2:]])
    return _table(
        ["INSTANCE", "STATE", "GPU", "MEMORY", "UTIL", "BUSY", "TTFT p50/p95", "WHY", "LOADED"],
        rows,
    )


def _gpu_cells(gpu: dict[str, Any]) -> list[str]:
    total = int(gpu.get("memory_total") or 0)
    used = int(gpu.get("memory_used") or 0)
    share = used / total if total else 0.0
    memory = f"{bar(share)} {used / GIB:5.1f}/{total / GIB:.1f} GiB {share:4.0%}"
    return [str(gpu.get("gpu", "?")), memory, f"{float(gpu.get('utilization') or 0):.0%}"]


def bar(share: float, width: int = BAR) -> str:
    """``[#####.....]`` in block characters: ``share`` (0..1) of ``width`` cells filled."""
    filled = round(min(max(share, 0.0), 1.0) * width)
    return "[" + "█" * filled + "░" * (width - filled) + "]"


def _reasons(reasons: dict[str, int]) -> str:
    ordered = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return " ".join(f"{reason}:{n}" for reason, n in ordered) or "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


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


def _can_draw(out: TextIO) -> bool:
    try:
        "█░".encode(getattr(out, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _ascii(text: str) -> str:
    return text.replace("█", "#").replace("░", ".")
