"""The chaos scenarios that stress the proxy: cancel storm, SIGTERM, 100 MB body, overload."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp

from benchmarks.chaos_box import Box
from benchmarks.chaos_client import Call, Client, Clock
from benchmarks.chaos_measure import percentile, within
from benchmarks.chaos_plan import MB, MODEL, SHIPPED, STORM_MODELS, Ctx, common_goals, goal, row


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


async def storm(ctx: Ctx) -> dict[str, Any]:
    """1,000 clients that leave 5-500 ms after sending (streamed or not, chat or generate, four
    models); then nothing may be left in flight and a fresh request for each model is served."""
    s, rng = ctx.sizes, ctx.rng

    def make() -> Call:
        return Call(model=rng.choice(STORM_MODELS), stream=rng.random() < 0.5,
                    num_predict=rng.randint(200, 600),
                    endpoint=rng.choice(("/api/chat", "/api/generate")))  # fmt: skip

    async with (
        Box(ctx.workdir, speed=s.speed, src=ctx.src, name="storm") as box,
        Client() as client,
    ):
        clock = Clock()
        poller = box.poller(clock)
        rss_before = box.rss()
        load = client.load(box.url, clock, rng)
        await load.storm(s.storm, s.storm_concurrency, make, (0.005, 0.5))
        await load.finish(clock() + s.grace)
        storm_s = clock()
        ctx.say(f"{s.storm} cancelling clients in {storm_s:.1f} s; settling")
        left = await box.settle(clock, clock() + (4.0 if s.quick else 10.0))
        fresh = client.load(box.url, clock, rng)
        for model in STORM_MODELS:
            fresh.send(Call(model=model, stream=False, num_predict=8))
        await fresh.finish(clock() + s.fresh_timeout)
        after_fresh = await box.settle(clock, clock() + 3.0)
        rss_after = box.rss()
        await poller.stop()
    served = sum(c.kind == "ok" for c in fresh.calls)
    out = row(
        "cancel storm", load.calls + fresh.calls, rss=(rss_before, rss_after, poller.peak_rss),
        left=left, storm_s=round(storm_s, 1), fresh_served=served,
        fresh=[c.row() for c in fresh.calls], inflight_after_fresh=after_fresh,
    )  # fmt: skip
    out["notes"].append(f"fresh request per model served: {served}/{len(STORM_MODELS)}")
    out["goals"] = [
        goal("0 in flight left", out["inflight_left"] == 0),
        goal("a fresh request per model served", served == len(STORM_MODELS)),
        goal("no silent cut", out["silent"] == 0),
    ]
    return out


async def sigterm(ctx: Ctx) -> dict[str, Any]:
    """SIGTERM to ``ollamux serve`` with long streams in flight: they should all end with
    ``done: true``; a request sent during the drain should be refused or get 503."""
    s = ctx.sizes
    drain = SHIPPED["drain"]
    async with (
        Box(ctx.workdir, speed=s.speed, src=ctx.src, name="sigterm") as box,
        Client() as client,
    ):
        clock = Clock()
        poller = box.poller(clock)
        load = client.load(box.url, clock, ctx.rng)
        for _ in range(s.sigterm_streams):
            load.send(Call(model=MODEL, num_predict=s.sigterm_tokens))
        deadline = clock() + 15.0
        while clock() < deadline and any(c.first is None and c.end is None for c in load.calls):
            await asyncio.sleep(0.05)
        streaming = sum(c.first is not None and c.end is None for c in load.calls)
        await asyncio.sleep(0.5)
        rss_before = box.rss()
        t_term = clock()
        os.kill(box.pid, signal.SIGTERM)
        ctx.say(f"SIGTERM with {streaming} streams in flight")
        await asyncio.sleep(0.3)
        probe = Call(model=MODEL, num_predict=8)
        load.send(probe)
        await load.finish(t_term + drain + 5.0)
        exited = await asyncio.to_thread(_wait_exit, box, drain + 10.0)
        exit_s = clock() - t_term if exited else None
        await poller.stop()
    streams = [c for c in load.calls if c is not probe]
    done = sum(c.kind == "ok" for c in streams)
    out = row(
        "sigterm", load.calls, rss=(rss_before, None, poller.peak_rss), left=None,
        streams=len(streams), streams_in_flight=streaming, streams_done=done,
        probe=probe.row(), exit_s=None if exit_s is None else round(exit_s, 1),
    )  # fmt: skip
    answer = probe.status or ("connection refused" if probe.refused_connection else probe.detail)
    out["notes"] += [f"{done}/{len(streams)} streams done", f"request during drain: {answer}",
                     f"exit {out['exit_s']} s after SIGTERM"]  # fmt: skip
    out["goals"] = [
        goal("100 % of streams done", done == len(streams)),
        goal("new request refused or 503", probe.kind == "refused"),
    ]
    return out


def _wait_exit(box: Box, timeout: float) -> bool:
    assert box.child is not None
    try:
        box.child.proc.wait(timeout)
    except Exception:  # subprocess.TimeoutExpired
        return False
    return True


async def big_body(ctx: Ctx) -> dict[str, Any]:
    """One 100 MB /api/chat body; the proxy's RSS before and after, GET / latency meanwhile."""
    s = ctx.sizes
    head = b'{"model":"%s","stream":false,"options":{"num_predict":8},"messages":[{"role":"user",' \
        b'"content":"' % MODEL.encode()  # fmt: skip
    payload = head + b"x" * (s.body_mb * MB - len(head) - 4) + b'"}]}'
    async with Box(ctx.workdir, speed=s.speed, src=ctx.src, name="body") as box, Client() as client:
        clock = Clock()
        load = client.load(box.url, clock, ctx.rng)
        await load.send(Call(model=MODEL, stream=False, num_predict=8))  # loads the model
        await asyncio.sleep(0.5)
        rss_before = box.rss()
        poller = box.poller(clock)
        pings: list[float] = []
        failed = [0]
        stop = asyncio.Event()

        async def ping() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with client.http.get(
                        box.url + "/", timeout=aiohttp.ClientTimeout(total=10)
                    ) as r:
                        await r.read()
                        pings.append(time.monotonic() - t0)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    failed[0] += 1
                await asyncio.sleep(0.025)

        pinger = asyncio.ensure_future(ping())
        try:
            await asyncio.sleep(0.5)
            big = Call(model=MODEL, stream=False, payload=payload)
            load.send(big)
            await load.finish(clock() + (40.0 if s.quick else 120.0))
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await pinger
        await asyncio.sleep(1.0)
        left = await box.settle(clock, clock() + 3.0)
        rss_after = box.rss()
        await poller.stop()
    took = None if big.end is None else round(big.end - big.sent, 2)
    out = row(
        f"{s.body_mb} MB body", [big], rss=(rss_before, rss_after, poller.peak_rss), left=left,
        body_status=big.status, body_s=took, get_root_p50_ms=_ms(percentile(pings, 50)),
        get_root_max_ms=_ms(max(pings, default=None)), get_root_failed=failed[0],
    )  # fmt: skip
    out["notes"] += [
        f"answer {big.status or big.detail[:40]} after {took} s",
        f"GET / p50 {out['get_root_p50_ms']} ms, max {out['get_root_max_ms']} ms",
    ]
    out["goals"] = [goal("RSS after within 10 %", within(rss_before, rss_after)),
                    goal("0 in flight left", out["inflight_left"] == 0)]  # fmt: skip
    return out


async def overload(ctx: Ctx) -> dict[str, Any]:
    """Open-loop arrivals well above what the box serves, for a bounded time: no 500s, fast 503s,
    flat RSS, and what was admitted is answered."""
    s = ctx.sizes

    def make() -> Call:
        return Call(model=MODEL, num_predict=300)

    async with (
        Box(ctx.workdir, speed=s.speed, src=ctx.src, name="overload") as box,
        Client() as client,
    ):
        clock = Clock()
        warm = client.load(box.url, clock, ctx.rng)
        warm.closed(16, make)
        await asyncio.sleep(s.warm)
        t_cap = clock()
        await warm.finish(clock() + 10.0)
        capacity = sum(1 for c in warm.calls if c.kind == "ok" and c.end and c.end >= t_cap - 2) / 2
        rss_before = box.rss()
        poller = box.poller(clock)
        load = client.load(box.url, clock, ctx.rng)
        rate = min(200.0, max(40.0, round(s.overload_x * capacity)))
        load.open(rate, s.overload_s, make)
        await asyncio.sleep(s.overload_s)
        await load.finish(clock() + 20.0)
        left = await box.settle(clock, clock() + 5.0)
        await asyncio.sleep(1.0)
        rss_after = box.rss()
        await poller.stop()
    calls = load.calls
    refusals = [c.end - c.sent for c in calls if c.status == 503 and c.end is not None]
    errors = sum(1 for c in calls if c.status is not None and c.status >= 500 and c.status != 503)
    ratio = round(rate / capacity, 1) if capacity else None
    out = row(
        "overload", calls, rss=(rss_before, rss_after, poller.peak_rss), left=left,
        offered_per_s=rate, capacity_per_s=capacity, overload_x=ratio, errors_5xx=errors,
        refused_p50_ms=_ms(percentile(refusals, 50)), refused_p99_ms=_ms(percentile(refusals, 99)),
    )  # fmt: skip
    out["notes"] += [f"{rate:g}/s offered, {ratio}x capacity",
                     f"503 p50 {out['refused_p50_ms']} ms, p99 {out['refused_p99_ms']} ms",
                     f"5xx other than 503: {errors}"]  # fmt: skip
    p99 = out["refused_p99_ms"]
    out["goals"] = [
        goal("no 5xx but 503", errors == 0),
        goal("503 p99 <= 100 ms", None if p99 is None else p99 <= 100),
        goal("RSS after within 10 %", within(rss_before, rss_after)),
        *common_goals(out, refused_ok=True),
    ]
    return out
