"""The chaos benchmark's sizes (quick and full), what a scenario gets to run, and its result row."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.chaos_client import Call
from benchmarks.chaos_measure import counts
from benchmarks.procs import ROOT

MODEL = "llama3.1:8b"
STORM_MODELS = ("llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "qwen2.5:7b")
MB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """Counts and times of one run; times are wall seconds (the proxy's deadlines are)."""

    quick: bool
    speed: float = 3.0
    """Emulator time compression: a 200-token answer of llama3.1:8b takes about 0.6 s."""
    clients: int = 12
    """Closed-loop users of the fault scenarios (the box has 16 slots)."""
    warm: float
    """Load before a fault; the baseline rate is its last 2 s."""
    after: float
    """Load after a fault (kill, freeze, die)."""
    after_hang: float
    """Load after a warm hang: the 15 s goal plus the recovery window."""
    grace: float
    """How long requests still running when the load stops may take before they count as hung."""
    cold_load: float | None
    """``timeouts.load`` for the cold hang (None: the shipped default, which the run then waits
    out)."""
    idle: float | None
    """``timeouts.idle`` for the freeze (None: the shipped default)."""
    storm: int = 1000
    storm_concurrency: int = 64
    fresh_timeout: float
    sigterm_streams: int
    sigterm_tokens: int
    overload_x: float = 6.0
    """Open-loop arrivals at this many times the rate the box served just before (40-200/s)."""
    overload_s: float
    body_mb: int = 100


QUICK = Sizes(
    quick=True, warm=3.0, after=6.0, after_hang=15.0, grace=2.0, cold_load=10.0, idle=10.0,
    fresh_timeout=8.0, sigterm_streams=12, sigterm_tokens=1500, overload_s=5.0,
)  # fmt: skip
FULL = Sizes(
    quick=False, warm=6.0, after=20.0, after_hang=25.0, grace=15.0, cold_load=None, idle=None,
    fresh_timeout=60.0, sigterm_streams=16, sigterm_tokens=3000, overload_s=30.0,
)  # fmt: skip
SHIPPED = {"load": 120.0, "idle": 30.0, "first_token": 10.0, "drain": 30.0}
"""The shipped ``timeouts`` the scenarios plan their waits around."""


@dataclass(kw_only=True)
class Ctx:
    """What a scenario runs with."""

    workdir: Path
    sizes: Sizes
    src: Path = ROOT
    rng: random.Random = field(default_factory=lambda: random.Random(12))
    quiet: bool = False

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    def mixed(self, model: str = MODEL) -> Call:
        """A chat or generate request, streamed 3 times in 4, 150-250 tokens."""
        rng = self.rng
        return Call(
            model=model,
            stream=rng.random() >= 0.25,
            num_predict=rng.randint(150, 250),
            endpoint="/api/chat" if rng.random() < 0.8 else "/api/generate",
        )


def mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


def left_over(seen: dict[str, int | None]) -> int | None:
    """Requests the proxy still counts (in flight by status or gauge, and queued)."""
    if seen.get("status") is None and seen.get("metrics") is None:
        return None
    return max(seen.get("status") or 0, seen.get("metrics") or 0) + (seen.get("queued") or 0)


def row(
    scenario: str,
    calls: list[Call],
    *,
    label: str = "",
    rss: tuple[int | None, int | None, int | None] = (None, None, None),
    left: dict[str, int | None] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A scenario's result: counts by kind, RSS (MB) before/after/peak, in flight left over,
    the requests lost, cut or silent (``failed``) and whatever else the scenario measured."""
    out: dict[str, Any] = {"scenario": scenario, "label": label or scenario, **counts(calls)}
    out["rss_before_mb"], out["rss_after_mb"], out["rss_peak_mb"] = (mb(v) for v in rss)
    out["inflight_left"] = None if left is None else left_over(left)
    out["inflight_seen"] = left
    out.update(extra)
    out.setdefault("notes", [])
    out.setdefault("goals", [])
    out["failed"] = [c.row() for c in calls if c.kind in ("lost", "cut", "silent")]
    return out


def goal(text: str, met: bool | None) -> dict[str, Any]:
    return {"goal": text, "met": met}


def common_goals(r: dict[str, Any], *, refused_ok: bool = False) -> list[dict[str, Any]]:
    """0 lost before the first byte (nor refused, unless refusing is the point), every cut ends
    with an error line, nothing left in flight."""
    lost = r["lost"] + (0 if refused_ok else r["refused"])
    out = [goal("0 lost" if refused_ok else "0 lost or refused", lost == 0),
           goal("no silent cut", r["silent"] == 0)]  # fmt: skip
    if r.get("inflight_left") is not None or "inflight_left" in r:
        out.append(goal("0 in flight left", r.get("inflight_left") == 0))
    return out
