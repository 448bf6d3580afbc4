"""From what the client and the sampler saw to the numbers of the report; the service-time bound.

Every time is in emulated (virtual) seconds: the wall time the client measured times the
emulator's speed. Requests still running at the deadline count as ``unfinished``; where a
percentile falls among them its value is only a lower bound (their wait until the deadline), and
the key is listed under ``censored``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.contenders import Box
from benchmarks.replay import Result, Watch
from benchmarks.workload import CONTEXT, Req, Scenario
from proxy.emulator.catalogue import Catalogue

OVERLOAD_GROWTH = 16
"""A backlog that grows, beyond what the arrivals themselves do (the lower bound's backlog), by more
than the whole box's slots (4 x 4) over the second half of the arrivals means the contender does
not keep up: its tail latencies grow with the run's length."""


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


def growth(series: Sequence[tuple[float, int]], window: float) -> float:
    """Least-squares growth of a backlog series over the second half of the arrival window."""
    points = [(t, n) for t, n in series if window / 2 <= t <= window]
    if len(points) < 3:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mn = sum(n for _, n in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    slope = sum((t - mt) * (n - mn) for t, n in points) / var if var else 0.0
    return slope * (window - window / 2)


def summarize(
    scenario: Scenario,
    results: Sequence[Result],
    watch: Watch,
    *,
    end: float,
    extra: dict[str, Any],
    ideal_growth: float = 0.0,
) -> dict[str, Any]:
    """One contender's numbers for the report; ``ideal_growth``: the lower bound's backlog growth
    over the same span (what the arrivals themselves do), subtracted from the contender's."""
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
    window = max((r.req.at for r in results if r.req.after is None), default=0.0)
    series = backlog(results, min(makespan, end))
    grew = growth(series, window) - ideal_growth
    out["backlog_growth"] = round(grew, 1)
    out["backlog_max"] = max((n for _, n in series), default=0)
    out["overloaded"] = grew > OVERLOAD_GROWTH or out["unfinished"] > 0.01 * len(results)
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
                part = latency([r for r in results if getattr(r.req, attr) == g], end)
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


def lower_bound(scenario: Scenario, box: Box) -> dict[str, Any]:
    """Every request served at once, alone, on the fastest GPU, its model loaded, its cache warm:
    no queueing, no load, no batching slowdown. No contender can beat it on any request."""
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
    end = max(r.done or 0.0 for r in results)
    return summarize(scenario, results, Watch(), end=end, extra={"overloaded": False})


def ideal_growth(scenario: Scenario, box: Box) -> float:
    """The lower bound's backlog growth: how much the arrivals alone pile up."""
    doc = lower_bound(scenario, box)
    return float(doc["backlog_growth"])
