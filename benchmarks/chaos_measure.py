"""The chaos benchmark's measures: counts by outcome, time to detect, time to recover (pure).

Definitions (``t_fault`` is the moment the fault was injected, on the scenario's clock):

- **detect**: the earlier of (a) the first status sample after ``t_fault`` in which the proxy shows
  the faulty instance ``down`` or ``ejected``, and (b) the first sample from which, for
  :data:`QUIET_S` seconds, the proxy routes no new request to it (its count of routed requests
  does not grow), holds nothing in flight there, and routes requests to other instances. A quiet
  instance that still holds requests (stuck on a hang) does not count: the proxy has not let go of
  it. Accurate to the sampling interval (0.2 s). None: neither happened by the end of the load.
- **recover**: the first moment ``T >= t_fault`` by which every disturbed request still running
  at the fault or sent after it is over, and from which the complete answers over
  ``[T, T + WINDOW_S]`` come at :data:`RATE_SHARE` or more of the rate over the
  :data:`BASELINE_S` s before the fault. A request is disturbed unless it got a complete answer
  whose first byte came within :data:`SLOW_S` s; its disturbance is over at its first byte if it
  was answered in the end (a retry elsewhere), else when it ended (cut, refused, lost, or given
  up at the harness's deadline). So a user stuck on the fault, or a new request that runs into
  it, holds recovery back until it is resolved. Only windows that end before the load stops
  count. None: not recovered by the end of the load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from benchmarks.chaos_box import Sample
from benchmarks.chaos_client import KINDS, Call

QUIET_S = 3.0
SLOW_S = 3.0
"""A first byte later than this is a disturbed request (undisturbed ones here: under 1 s)."""
WINDOW_S = 2.0
RATE_SHARE = 0.8
BASELINE_S = 2.0
STEP_S = 0.1
MARKED = frozenset({"down", "ejected"})


def counts(calls: Sequence[Call]) -> dict[str, int]:
    """``requests`` and one count per kind of :data:`KINDS`, plus ``hung``."""
    out = {"requests": len(calls), **{k: 0 for k in KINDS}, "hung": 0}
    for call in calls:
        out[call.kind] += 1
        out["hung"] += call.hung
    return out


def marked(samples: Sequence[Sample], target: str, t_fault: float) -> float | None:
    """Seconds from the fault to the first sample showing ``target`` down or ejected."""
    for s in samples:
        if s.t >= t_fault and s.states.get(target) in MARKED:
            return s.t - t_fault
    return None


def quiet(
    samples: Sequence[Sample], target: str, t_fault: float, quiet_s: float = QUIET_S
) -> float | None:
    """Seconds from the fault to the first sample that opens a quiet stretch (see the module)."""
    seen = [s for s in samples if s.t >= t_fault and target in s.bindings]
    for i, first in enumerate(seen):
        span = [s for s in seen[i:] if s.t <= first.t + quiet_s]
        if span[-1].t - first.t < quiet_s - 0.5:  # the samples end too soon to tell
            return None
        if any(
            s.bindings[target] != first.bindings[target] or s.inflight.get(target) for s in span
        ):
            continue
        others = sum(v for k, v in span[-1].bindings.items() if k != target) - sum(
            v for k, v in first.bindings.items() if k != target
        )
        if others > 0:
            return first.t - t_fault
    return None


def detect(samples: Sequence[Sample], target: str, t_fault: float) -> float | None:
    found = [
        x
        for x in (marked(samples, target, t_fault), quiet(samples, target, t_fault))
        if x is not None
    ]
    return min(found) if found else None


def routed_after(samples: Sequence[Sample], target: str, since: float) -> tuple[int, int]:
    """(requests routed to ``target``, to all instances) between ``since`` and the last sample."""
    seen = [s for s in samples if s.bindings]
    before = [s for s in seen if s.t < since]
    after = [s for s in seen if s.t >= since]
    if not after or (not before and len(after) < 2):
        return 0, 0
    first, last = (before[-1] if before else after[0]), after[-1]
    mine = last.bindings.get(target, 0) - first.bindings.get(target, 0)
    total = sum(last.bindings.values()) - sum(first.bindings.values())
    return mine, total


def timeline(samples: Sequence[Sample], target: str) -> list[list[object]]:
    """``[t, state, in flight, routed so far]`` of ``target`` at each change (for the JSON)."""
    out: list[list[object]] = []
    for s in samples:
        point = [s.states.get(target, "?"), s.inflight.get(target), s.bindings.get(target)]
        if not out or out[-1][1:] != point:
            out.append([round(s.t, 2), *point])
    return out


def undisturbed(call: Call) -> bool:
    ttfb = call.ttfb
    return call.kind == "ok" and ttfb is not None and ttfb <= SLOW_S


def baseline_rate(calls: Sequence[Call], t_fault: float, base_s: float = BASELINE_S) -> float:
    """Complete answers per second over the ``base_s`` seconds before the fault."""
    ends = [c.end for c in calls if c.kind == "ok" and c.end is not None]
    return sum(1 for end in ends if t_fault - base_s <= end < t_fault) / base_s


def recover(calls: Sequence[Call], t_fault: float, load_end: float) -> float | None:
    """Seconds from the fault to recovery (see the module), None if not before ``load_end``."""
    base = baseline_rate(calls, t_fault)
    over = [
        (c.first if c.kind == "ok" and c.first is not None else c.end or load_end) + 1e-6
        for c in calls
        if not undisturbed(c) and (c.end is None or c.end >= t_fault)
    ]
    start = max([t_fault, *over])
    ends = sorted(c.end for c in calls if c.kind == "ok" and c.end is not None)
    need = RATE_SHARE * base * WINDOW_S
    t = start
    while t + WINDOW_S <= load_end + 1e-9:
        if sum(1 for e in ends if t <= e < t + WINDOW_S) >= need:
            return t - t_fault
        t += STEP_S
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def within(before: int | None, after: int | None, share: float = 0.10) -> bool | None:
    """``after`` is at most ``share`` above ``before`` (None when either is unknown)."""
    if not before or after is None:
        return None
    return after <= before * (1 + share)
