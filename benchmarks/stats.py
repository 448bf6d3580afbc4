"""From what the client and the sampler saw to the numbers of the report; the service-time bound.

Every time is in emulated (virtual) seconds: the wall time the client measured times the
emulator's speed. Requests still running at the deadline count as ``unfinished``; where a
percentile falls among them its value is only a lower bound (their wait until the deadline), and
the key is listed under ``censored``.

**Overloaded.** A contender's *excess backlog* is the number of its requests sent and not answered
minus the lower bound's at the same emulated second (what the arrivals themselves pile up), over
the whole run. Its *drain time* (``drain_s``) is how long after the last fixed arrival (the end of
the arrival window; chat follow-ups are not arrivals of their own) the excess backlog takes to fall
to at most the box's slots (16). A contender is ``overloaded`` when its drain time exceeds 10 % of
the arrival window (it fell that far behind the offered load, so its tails grow with the run's
length), when it never drains before the deadline, or when over 1 % of its requests were left
unfinished. A burst early in the window that the contender works off before the window ends, or
one late in it that it drains within that time, does not flag it; a burst it never works off does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.contenders import Box
from benchmarks.replay import Result, Watch
from benchmarks.workload import CONTEXT, Req, Scenario
from proxy.emulator.catalogue import Catalogue

OVERLOAD_EXCESS = 16
"""The box's slots (4 x 4): an excess backlog this small is work in progress, not a queue."""
OVERLOAD_DRAIN_SHARE = 0.1
"""Drain time, as a share of the arrival window, beyond which a contender is overloaded: its
capacity fell that much short of the offered load over the run."""
OVERLOAD_UNFINISHED_SHARE = 0.01


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _censored_percentiles(
    observed: list[float],
    censored: list[float],
    qs: Iterable[tuple[str, float]],
    out: dict[str, Any],
) -> list[str]:
    """Percentiles over observed and censored values; names of those that hit a censored one."""
    pairs = sorted([(v, False) for v in observed] + [(v, True) for v in censored])
    hit = []
    for key, q in qs:
        if not pairs:
            out[key] = None
            continue
        pos = (len(pairs) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        value = pairs[lo][0] + (pairs[hi][0] - pairs[lo][0]) * (pos - lo)
        out[key] = round(value, 4)
        if pairs[hi][1] or pairs[lo][1]:
            hit.append(key)
    return hit


def latency(results: Sequence[Result], end: float) -> dict[str, Any]:
    """TTFT over streamed requests, end-to-end over all; failed requests are left out."""
    out: dict[str, Any] = {"n": len(results)}
    ttft_seen, ttft_cut, e2e_seen, e2e_cut = [], [], [], []
    for r in results:
        if r.error or r.sent is None:
            continue
        if r.req.stream:
            if r.first is not None:
                ttft_seen.append(r.first - r.sent)
            else:
                ttft_cut.append(end - r.sent)
        if r.done is not None:
            e2e_seen.append(r.done - r.sent)
        else:
            e2e_cut.append(end - r.sent)
    censored = _censored_percentiles(
        ttft_seen, ttft_cut, [("ttft_p50_s", 50), ("ttft_p95_s", 95), ("ttft_p99_s", 99)], out
    )
    censored += _censored_percentiles(
        e2e_seen, e2e_cut, [("e2e_p50_s", 50), ("e2e_p95_s", 95)], out
    )
    out["ttft_mean_s"] = round(sum(ttft_seen) / len(ttft_seen), 4) if ttft_seen else None
    ttfts = ttft_seen + ttft_cut
    out["ttft_quantiles_s"] = [round(percentile(ttfts, q), 4) for q in range(101)] if ttfts else []
    if censored:
        out["censored"] = censored
    return out


def backlog(results: Sequence[Result], end: float) -> list[tuple[float, int]]:
    """Requests sent and not finished, once per emulated second until ``end``."""
    events: list[tuple[float, int]] = []
    for r in results:
        if r.sent is None:
            continue
        events.append((r.sent, 1))
        events.append((r.done if r.done is not None else math.inf, -1))
    events.sort()
    out, n, i = [], 0, 0
    for step in range(int(end) + 1):
        while i < len(events) and events[i][0] <= step:
            n += events[i][1]
            i += 1
        out.append((float(step), n))
    return out


def drain_time(
    series: Sequence[tuple[float, int]], bound: Sequence[tuple[float, int]], window: float
) -> float | None:
    """Seconds after ``window`` until ``series`` is at most ``OVERLOAD_EXCESS`` above ``bound``
    (both once per emulated second from 0); None when that never happens within ``series``."""
    for t, n in series:
        if t < math.floor(window):  # the sample of the window's last second counts
            continue
        i = int(t)
        ideal = bound[i][1] if i < len(bound) else 0
        if n - ideal <= OVERLOAD_EXCESS:
            return max(t - window, 0.0)
    return None


def overloaded(drain_s: float | None, window: float, unfinished: int, requests: int) -> bool:
    """The rule of the module docstring, on a contender's numbers."""
    if unfinished > OVERLOAD_UNFINISHED_SHARE * requests:
        return True
    return drain_s is None or drain_s > OVERLOAD_DRAIN_SHARE * window


def arrival_window(requests: Iterable[Req]) -> float:
    """The last fixed arrival time (requests that follow no other one)."""
    return max((r.at for r in requests if r.after is None), default=0.0)


def summarize(
    scenario: Scenario,
    results: Sequence[Result],
    watch: Watch,
    *,
    end: float,
    extra: dict[str, Any],
    bound: Sequence[tuple[float, int]] = (),
) -> dict[str, Any]:
    """One contender's numbers for the report; ``bound``: the lower bound's backlog once per
    emulated second (what the arrivals themselves pile up), the reference of the drain time."""
    ok = [r for r in results if r.ok]
    finished = [r.done for r in results if r.done is not None]
    makespan = max(finished) if finished else end
    tokens = sum(r.eval_count for r in ok)
    out: dict[str, Any] = latency(results, end)
    out["requests"] = out.pop("n")
    out["failed"] = sum(1 for r in results if r.error)
    out["unfinished"] = sum(1 for r in results if r.unfinished)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            key = r.error[:80]
            errors[key] = errors.get(key, 0) + 1
    if errors:
        out["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    out["tokens_per_s"] = round(tokens / makespan, 2) if makespan > 0 else 0.0
    out["output_tokens"] = tokens
    out["makespan_s"] = round(makespan, 2)
    out["cold_loads"] = watch.loads
    out["evictions"] = watch.evictions
    out["keep_alive_expiries"] = watch.expiries
    out["gpu_busy_s"] = {g: round(s, 1) for g, s in sorted(watch.busy.items())}
    busy = list(watch.busy.values())
    if busy and max(busy) > 0:
        out["gpu_busy_max_over_mean"] = round(max(busy) / (sum(busy) / len(busy)), 3)
    window = arrival_window(r.req for r in results)
    series = backlog(results, min(makespan, end))
    drain = drain_time(series, bound, window)
    out["arrival_window_s"] = round(window, 2)
    out["drain_s"] = None if drain is None else round(drain, 1)
    out["backlog_max"] = max((n for _, n in series), default=0)
    out["overloaded"] = overloaded(drain, window, out["unfinished"], len(results))
    step = max(len(series) // 150, 1)
    out["backlog_series"] = [[t, n] for t, n in series[::step]]
    where: dict[str, dict[str, int]] = {}
    for _t, backend, model in watch.load_events:
        per = where.setdefault(f"backend{backend}", {})
        per[model] = per.get(model, 0) + 1
    out["loads_by_backend"] = {b: dict(sorted(m.items())) for b, m in sorted(where.items())}
    for attr, key in (("kind", "by_kind"), ("model", "by_model")):
        groups = sorted({getattr(r.req, attr) for r in results})
        if len(groups) > 1:
            out[key] = {}
            for g in groups:
                group = [r for r in results if getattr(r.req, attr) == g]
                part = latency(group, end)
                part["failed"] = sum(1 for r in group if r.error)
                part.pop("ttft_quantiles_s")
                part.pop("ttft_mean_s")
                out[key][g] = part
    out |= extra
    return out


# --- the lower bound ---------------------------------------------------------------------------


def service_times(req: Req, catalogue: Catalogue, speed: float) -> tuple[float, float]:
    """(time to first byte, end-to-end) of ``req`` alone on an idle GPU of relative ``speed``
    with its model loaded and its session's previous prompt in cache (the emulator's timing)."""
    spec = catalogue.find(req.model)
    assert spec is not None, req.model
    prompt = min(req.prompt_tokens, CONTEXT)
    prefill = max(prompt - min(req.cached_tokens, prompt), 1) / (spec.prompt_tps * speed)
    interval = 1 / (spec.decode_tps * speed)
    e2e = prefill + req.output_tokens * interval
    if not req.stream:
        return e2e, e2e
    return (prefill + interval if req.output_tokens else prefill), e2e


def _bound_results(scenario: Scenario, box: Box) -> list[Result]:
    catalogue = Catalogue()
    fastest = max(g.speed for g in box.gpus)
    results = [Result(req=r) for r in scenario.requests]
    pending = sorted((r for r in scenario.requests if r.after is None), key=lambda r: r.at)
    followers: dict[int, list[Req]] = {}
    for r in scenario.requests:
        if r.after is not None:
            followers.setdefault(r.after, []).append(r)
    starts = {r.id: r.at for r in pending}
    order = [r.id for r in pending]
    i = 0
    while i < len(order):
        res = results[order[i]]
        i += 1
        first, e2e = service_times(res.req, catalogue, fastest)
        res.sent = starts[res.req.id]
        res.first, res.done = res.sent + first, res.sent + e2e
        res.eval_count = res.req.output_tokens
        for nxt in followers.get(res.req.id, ()):
            starts[nxt.id] = res.done + nxt.think
            order.append(nxt.id)
    return results


def lower_bound(scenario: Scenario, box: Box) -> dict[str, Any]:
    """Every request served at once, alone, on the fastest GPU, its model loaded, its cache warm:
    no queueing, no load, no batching slowdown. No contender can beat it on any request."""
    results = _bound_results(scenario, box)
    end = max(r.done or 0.0 for r in results)
    doc = summarize(scenario, results, Watch(), end=end, extra={}, bound=backlog(results, end))
    doc["overloaded"] = False
    return doc


def bound_backlog(scenario: Scenario, box: Box) -> list[tuple[float, int]]:
    """The lower bound's backlog once per emulated second: how much the arrivals alone pile up."""
    results = _bound_results(scenario, box)
    return backlog(results, max(r.done or 0.0 for r in results))
